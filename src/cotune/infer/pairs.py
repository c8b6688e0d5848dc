"""Preference pairs from the model's own work: its sampled replies, checked, and its stage search.

* ``on_policy_pairs``: N sampled replies of the current adapter per record, each scored against the
  record's known answer (a reply that breaks the four-stage format counts as wrong); a right reply is
  paired with a wrong one of the same record.
* ``stage_pairs``: LLaVA-CoT's stage search; at each stage, the winning candidate against a losing
  one, the other stages the search's own, so the pair differs in that one stage only. With a known
  answer, only searches that end right give pairs (the winner chain must not teach a wrong answer).

Pairs are written in cotune's layout (``data.pairs.pair_record``) and read back by ``cotune train
--method dpo``. Work is saved after every batch of records (``OUT.partial.jsonl``): a killed run
resumes where it stopped and gives the pairs an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cotune.data.answers import match_answer as check_answer
from cotune.data.cot import follows_format, parse_stages
from cotune.data.pairs import match_pairs, pair_record, rebase_images, write_jsonl
from cotune.data.sample import Sample
from cotune.infer.generate import generate
from cotune.infer.stage_search import stage_search


def match_answer(prediction: str, gold: str, question: str | None = None) -> bool:
    """The eval's and ``data reason``'s answer check (``cotune.data.answers``): yes/no, choice, number, text."""
    return bool(check_answer(prediction, gold, question=question))


def gold_answer(sample: Sample) -> str | None:
    """The record's ``answer`` field, else the CONCLUSION of its first reply, else None."""
    answer = sample.meta.get("answer")
    if isinstance(answer, str | int | float) and str(answer).strip():
        return str(answer)
    replies = [m for m in sample.messages if m["role"] == "assistant"]
    text = "".join(i.get("text", "") for i in replies[0]["content"]) if replies else ""
    return parse_stages(text).get("CONCLUSION") or None


def reply_is_right(reply: str, gold: str, question: str | None = None) -> bool:
    """Four-stage format kept and the CONCLUSION matches ``gold``."""
    if not follows_format(reply):
        return False
    return match_answer(parse_stages(reply)["CONCLUSION"], gold, question)


def prompt_of(sample: Sample) -> tuple[list[dict], str]:
    """The messages before the first reply, and the question in cotune's pair layout (``<image>`` marks)."""
    k = next(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    prompt = sample.messages[:k]
    parts = []
    for m in prompt:
        if m["role"] != "user":
            continue
        parts += ["<image>" if i["type"] == "image" else i.get("text", "") for i in m["content"]]
    return prompt, "\n".join(parts)


def _image_field(sample: Sample) -> Any:
    refs = [os.path.abspath(r) for r in sample.images]  # ``build_pairs`` makes them relative to its file
    return refs[0] if len(refs) == 1 else refs


def reference_reply(sample: Sample) -> str | None:
    """The record's own first reply (its known-good answer), or None."""
    reply = next((m for m in sample.messages if m["role"] == "assistant"), None)
    return "".join(i.get("text", "") for i in reply["content"]) if reply else None


def pairs_of_replies(
    sample: Sample, replies: list[str], per_record: int, chosen: str = "sampled"
) -> list[dict]:
    """Right vs wrong replies of one record as pair records.

    Args:
        sample: the record (its known answer decides right and wrong).
        replies: the adapter's sampled replies to it.
        per_record: at most this many pairs.
        chosen: 'sampled' pairs a right sample with a wrong one (none when all are right or all
            wrong); 'reference' pairs the record's own reply with each wrong sample (a sample that
            is right by its conclusion may still reason wrongly on the way).
    """
    gold = gold_answer(sample)
    if gold is None:
        return []
    _, question = prompt_of(sample)
    right = list(dict.fromkeys(r for r in replies if reply_is_right(r, gold, question)))
    wrong = list(dict.fromkeys(r for r in replies if not reply_is_right(r, gold, question)))
    n_right = len(right)
    if chosen == "reference":
        ref = reference_reply(sample)
        right = [ref] if ref else []
        wrong = [w for w in wrong if w.strip() != (ref or "").strip()]
    out = []
    for k, (c, r) in enumerate(match_pairs(right, wrong, per_record)):
        rid = sample.id if k == 0 else f"{sample.id}#{k}"
        meta = dict(answer=gold, source="samples", chosen_from=chosen, right=n_right, sampled=len(replies))
        out.append(pair_record(rid, _image_field(sample), question, c, r, **meta))
    return out


def on_policy_pairs(
    model: Any, processor: Any, family: Any, samples: list[Sample], n: int = 4, per_record: int = 1,
    batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
    skip: int = 0, chosen: str = "sampled",
) -> Iterator[tuple[int, list[dict]]]:  # fmt: skip
    """Yields (batch index, pairs) per batch of ``batch_size`` records: ``n`` sampled replies each.

    A batch's sampling is seeded by ``seed`` and the batch index, so a resumed run (``build_pairs``)
    draws what an uninterrupted one would; the first ``skip`` batches (done before) are not sampled.
    """
    for b, start in enumerate(range(0, len(samples), batch_size)):
        if b < skip:
            continue
        batch = samples[start : start + batch_size]
        prompts = [(prompt_of(s)[0], s.images) for s in batch for _ in range(n)]
        replies = generate(
            model, processor, family, prompts, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=temperature, top_p=top_p, seed=seed * 100_003 + b,
        )  # fmt: skip
        pairs = []
        for i, s in enumerate(batch):
            pairs += pairs_of_replies(s, replies[i * n : (i + 1) * n], per_record, chosen)
        yield b, pairs


def stage_pairs_of(sample: Sample, steps: list[dict], per_record: int) -> list[dict]:
    """One search's pairs: at each stage, the winner against a valid losing candidate (other stages equal)."""
    winners = [s["candidates"][s["winner"]] for s in steps]
    chosen = "".join(winners)
    _, question = prompt_of(sample)
    gold = gold_answer(sample)
    if gold is not None and not reply_is_right(chosen, gold, question):
        return []
    out = []
    for k, step in enumerate(steps):
        losers = [
            c for i, (c, ok) in enumerate(zip(step["candidates"], step["valid"]))
            if ok and i != step["winner"] and c.strip() != winners[k].strip()
        ]  # fmt: skip
        if not losers:
            continue
        rejected = "".join(winners[:k] + [losers[0]] + winners[k + 1 :])
        rid = f"{sample.id}@{step['stage'].lower()}"
        meta = dict(answer=gold, source="stages", stage=step["stage"])
        out.append(pair_record(rid, _image_field(sample), question, chosen, rejected, **meta))
        if len(out) >= per_record:
            break
    return out


def stage_search_pairs(
    model: Any, processor: Any, family: Any, samples: list[Sample], beam_size: int = 4, per_record: int = 1,
    max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, skip: int = 0,
) -> Iterator[tuple[int, list[dict]]]:  # fmt: skip
    """Yields (record index, pairs) per record, from one stage search each (seeded per record); the
    first ``skip`` records (done before) are not searched."""
    for i, s in enumerate(samples):
        if i < skip:
            continue
        prompt, _ = prompt_of(s)
        result = stage_search(
            model, processor, family, prompt, s.images, beam_size=beam_size, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed * 100_003 + i,
        )  # fmt: skip
        yield i, stage_pairs_of(s, result.steps, per_record)


def build_pairs(
    out: str | Path, chunks: Callable[[int], Iterator[tuple[int, list[dict]]]], total: int, log=print
) -> tuple[Path, int]:
    """Runs ``chunks(skip)`` (batches of pairs, numbered), saving each to ``OUT.partial.jsonl`` as it
    comes, and writes ``out`` atomically at the end. A partial file from a killed run is continued.

    Returns:
        (the pairs file, how many pairs it holds).
    """
    out = Path(out)
    partial = out.parent / f"{out.name}.partial.jsonl"
    done: list[dict] = []
    if partial.exists():  # each line is one finished chunk; a torn last line is dropped
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break
        log(f"resuming: {len(done)} of {total} batches done in {partial}")
        partial.write_text("".join(json.dumps(d) + "\n" for d in done), encoding="utf-8")
    with open(partial, "a", encoding="utf-8") as f:
        for index, pairs in tqdm(
            chunks(len(done)), total=total, initial=len(done), desc="pairs", dynamic_ncols=True
        ):
            done.append({"chunk": index, "pairs": pairs})
            f.write(json.dumps(done[-1], ensure_ascii=False) + "\n")
            f.flush()
    records = [rebase_images(p, ".", out.parent) for d in done for p in d["pairs"]]
    write_jsonl(out, records)
    partial.unlink()
    return out, len(records)


def run_pairs_command(cfg: Any, data: str, log=print) -> int:
    """``cotune data pairs DATA``: pairs from an attempts file, or from the adapter's samples or
    stage search on the records of ``DATA``; returns the exit code."""
    import functools

    from cotune.data.pairs import pairs_from_attempts
    from cotune.data.records import load_samples, report_problems

    p = cfg.pairs
    if p.source == "attempts":
        records, problems = pairs_from_attempts(data, per_record=p.per_record)
        records = [rebase_images(r, Path(data).parent, Path(p.pairs_file).parent) for r in records]
        report_problems(problems, cfg.data.on_error, len(records) + len(problems), log=log)
        write_jsonl(p.pairs_file, records)
        log(f"{len(records)} pairs (accepted vs rejected attempts) written to {p.pairs_file}")
        if any(os.path.isabs(str(r.get("image", ""))) for r in records):
            log("note: images outside the pairs file's folder are named by absolute paths: train with "
                "--data.image_root set to a folder that holds them")  # fmt: skip
        return 0 if records else 1
    from cotune.infer.adapters import load_model_with_adapters, parse_adapter_specs

    d = cfg.data
    samples, problems = load_samples(
        data, d.image_root, d.system_prompt, fmt=d.format, columns=d.columns, log=log
    )
    report_problems(problems, d.on_error, len(samples) + len(problems), log=log)
    samples = samples[: p.first_records] if p.first_records else samples
    specs = parse_adapter_specs(cfg.adapter)
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name,
        cfg.quantization, cfg.quantization_config, d.date_string,
    )  # fmt: skip
    g, seed = cfg.generation, max(cfg.seed, 0)
    common = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=seed)
    if p.source == "samples":
        chunks = functools.partial(
            on_policy_pairs, model, processor, family, samples, n=p.n, per_record=p.per_record,
            batch_size=p.records_per_batch, chosen=p.chosen, **common,
        )  # fmt: skip
        total = -(-len(samples) // p.records_per_batch)
    else:
        chunks = functools.partial(
            stage_search_pairs,
            model,
            processor,
            family,
            samples,
            beam_size=p.n,
            per_record=p.per_record,
            **common,
        )
        total = len(samples)
    out, n = build_pairs(p.pairs_file, lambda skip: chunks(skip=skip), total, log=log)
    log(f"{n} pairs from {len(samples)} records ({p.source}) written to {out}")
    return 0 if n else 1
