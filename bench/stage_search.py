"""What stage-level beam search costs, fed over a shared prefix against recomputing every prompt.

Runs ``stage_search`` on held-out questions of the demo's data with the demo's adapter, twice per
question with the same seed: as cotune runs it (candidates decoded as one batch over the shared
prefix, ``cotune.infer.prefix``) and as it ran before (``RecomputingSampler`` and
``RecomputingJudge`` below: every candidate and every judging prompt re-reads its whole prompt
through ``generate_ids``, and each re-encodes the image). Counts the tokens fed through the language
model and the images through the vision tower with forward hooks (``ForwardCounter``), and the
search's own ``TokenMeter``; prints a table and, last, one line
``stage_search_token_ratio=X stage_search_time_ratio=Y``.

The two sides sample from different random streams (each candidate has its own generator now), so
their candidates differ; the ratio is over all questions together.

Usage:
    python bench/stage_search.py [--model_name demo_out/tiny] [--adapter demo_out/run/adapter]
        [--data demo_out/data/test.jsonl] [--n 10] [--beam_size 4] [--seed 42] [--threads 0]
(``make demo`` writes demo_out.)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from cotune.infer.generate import TokenMeter, encode_prompt, generate_ids, prompt_batch
from cotune.infer.stage_search import ModelJudge, parse_choice


class RecomputingSampler:
    """Stage search's sampler before the shared prefix: N copies of the prompt in one ``generate``."""

    def __init__(
        self,
        model,
        processor,
        family,
        messages,
        images,
        meter,
        max_new_tokens=256,
        temperature=0.7,
        top_p=0.9,
    ):
        self.model, self.processor, self.family = model, processor, family
        self.messages, self.images, self.meter = messages, images, meter
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def __call__(self, prefix: list[int], stop: str | None, n: int) -> list[list[int]]:
        item = encode_prompt(self.processor, self.family, self.messages, self.images, prefix)
        return generate_ids(
            self.model, self.processor, self.family, [item] * n, max_new_tokens=self.max_new_tokens,
            do_sample=True, temperature=self.temperature, top_p=self.top_p,
            stop_strings=[stop] if stop else None, meter=self.meter,
        )  # fmt: skip


class RecomputingJudge(ModelJudge):
    """Stage search's judge before the shared prefix: each pair's whole prompt, in one ``generate``."""

    def __call__(self, stage, messages, images, context, pairs) -> list[int]:
        items = self._items(stage, messages, images, context, pairs)
        rows = generate_ids(
            self.model,
            self.processor,
            self.family,
            items,
            max_new_tokens=self.max_new_tokens,
            meter=self.meter,
        )
        answers = self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True)
        choices = [parse_choice(a) for a in answers]
        unclear = [k for k, c in enumerate(choices) if c is None]
        if unclear:
            fallback = self.logit_choice(stage, messages, images, context, [pairs[k] for k in unclear])
            for k, c in zip(unclear, fallback):
                choices[k] = c
        for pair, answer, choice, k in zip(pairs, answers, choices, range(len(pairs))):
            self.transcript.append(
                dict(stage=stage, pair=pair, answer=answer, choice=choice, by_logits=k in unclear)
            )
        return choices

    @torch.no_grad()
    def logit_choice(self, stage, messages, images, context, pairs, fed=None) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids_1 = tokenizer("I choose response 1", add_special_tokens=False)["input_ids"]
        ids_2 = tokenizer("I choose response 2", add_special_tokens=False)["input_ids"]
        if ids_1[:-1] != ids_2[:-1]:
            return [0] * len(pairs)
        items = self._items(stage, messages, images, context, pairs, continuation=ids_1[:-1])
        batch = prompt_batch(self.model, self.processor, self.family, items)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(**batch, use_cache=False).logits[:, -1].float()
        finally:
            self.model.train(was_training)
        self.meter.prompt += int(batch["attention_mask"].sum())
        self.meter.calls += 1
        return [int(row[ids_2[-1]] > row[ids_1[-1]]) for row in logits]


class ForwardCounter:
    """Counts what goes through an Mllama model: text tokens fed to the language model (``fed``,
    padding included; ``real``, padding left out) and images through the vision tower."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.fed = self.real = self.forwards = self.vision_calls = self.images = 0
        self._handles = [
            inner.model.language_model.register_forward_pre_hook(self._text, with_kwargs=True),
            inner.model.vision_model.register_forward_pre_hook(self._vision, with_kwargs=True),
        ]

    def _text(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        ids = ids if ids is not None else args[0]
        mask = kwargs.get("attention_mask")
        self.fed += ids.numel()
        plan = getattr(kwargs.get("cache"), "plan", None)  # a BatchCache knows its real tokens
        if plan is not None:
            self.real += plan.tokens
        else:
            self.real += int(mask[:, -ids.shape[1] :].sum()) if mask is not None else ids.numel()
        self.forwards += 1

    def _vision(self, module: Any, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values")
        pixels = pixels if pixels is not None else args[0]
        self.vision_calls += 1
        self.images += pixels.shape[0] * pixels.shape[1]  # samples x images per sample

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def run_search(model, processor, family, messages, images, args, recompute: bool) -> dict:
    """One search; its reply, meter, forward counts and wall time."""
    from cotune.infer.stage_search import stage_search

    meter, counter = TokenMeter(), ForwardCounter(model)
    kwargs: dict[str, Any] = {}
    if recompute:
        kwargs["judge"] = RecomputingJudge(model, processor, family, meter)
        kwargs["sampler"] = RecomputingSampler(
            model, processor, family, messages, images, meter, args.max_new_tokens, 0.7, 0.9
        )
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = stage_search(
            model, processor, family, messages, images, beam_size=args.beam_size,
            max_new_tokens=args.max_new_tokens, seed=args.seed, **kwargs,
        )  # fmt: skip
    finally:
        counter.close()
    meter = meter if recompute else result.meter
    return dict(
        seconds=time.perf_counter() - t0, cpu_s=time.process_time() - c0, meter=meter.total, fed=counter.fed, real=counter.real,
        forwards=counter.forwards, vision_calls=counter.vision_calls, images=counter.images,
        comparisons=result.comparisons, text=result.text,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_name", default="demo_out/tiny")
    ap.add_argument("--adapter", default="demo_out/run/adapter")
    ap.add_argument("--data", default="demo_out/data/test.jsonl")
    ap.add_argument("--n", type=int, default=10, help="questions")
    ap.add_argument("--beam_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cotune.data.records import load_samples
    from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
    from cotune.infer.generate import generate, prompt_messages

    model, processor, family = load_model_with_adapters(args.model_name, [AdapterSpec("demo", args.adapter)])
    samples, _ = load_samples(args.data)
    totals = {
        side: dict.fromkeys(("seconds", "cpu_s", "meter", "fed", "real", "vision_calls", "images"), 0)
        for side in "on"
    }
    print("question | plain | old: meter fed images s | new: meter fed images s | meter ratio")
    for sample in samples[: args.n]:
        messages, images = prompt_messages(sample), sample.images
        plain = TokenMeter()
        generate(
            model, processor, family, [(messages, images)], max_new_tokens=args.max_new_tokens, meter=plain
        )
        old = run_search(model, processor, family, messages, images, args, recompute=True)
        new = run_search(model, processor, family, messages, images, args, recompute=False)
        for side, row in (("o", old), ("n", new)):
            for k in totals[side]:
                totals[side][k] += row[k]
        print(
            f"{sample.id} | {plain.total} | {old['meter']} {old['fed']} {old['images']} {old['seconds']:.1f} | "
            f"{new['meter']} {new['fed']} {new['images']} {new['seconds']:.1f} | {old['meter'] / new['meter']:.2f}",
            flush=True,
        )
    o, n = totals["o"], totals["n"]
    print(
        f"total over {args.n}: old meter {o['meter']:,} fed {o['fed']:,} (real {o['real']:,}) images {o['images']} "
        f"{o['seconds']:.1f} s ({o['cpu_s']:.1f} s CPU); new meter {n['meter']:,} fed {n['fed']:,} (real {n['real']:,}) "
        f"images {n['images']} {n['seconds']:.1f} s ({n['cpu_s']:.1f} s CPU); "
        f"per search old {o['meter'] / args.n:,.0f} new {n['meter'] / args.n:,.0f} tokens"
    )
    print(
        f"stage_search_token_ratio={o['meter'] / n['meter']:.2f} fed_ratio={o['fed'] / n['fed']:.2f} "
        f"stage_search_time_ratio={o['seconds'] / n['seconds']:.2f} cpu_time_ratio={o['cpu_s'] / n['cpu_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
