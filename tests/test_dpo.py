"""DPO: pair files in three layouts, the loss against an independent implementation, ln 2 at the start,
exact resume, two processes equal one, and pairs from attempts and from the model's samples."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cotune.data.pair_batches import PairCollator, PairDataset, encode_pairs
from cotune.data.pairs import pairs_from_attempts, read_pairs
from cotune.train.loss import ChunkedLossModel
from cotune.train.metrics import read_metrics
from cotune.train.objectives import DPO, attach_reference
from test_distributed import _adapter, _assert_same_adapter, _in_process, _run

LN2 = math.log(2.0)


def _gold_pairs(shapes: dict, n: int = 12) -> list[dict]:
    """Pairs from the synthetic records: the reference reply against one with another conclusion."""
    out = []
    for line in Path(shapes["train"]).read_text().splitlines()[:n]:
        r = json.loads(line)
        reply = r["conversations"][1]["value"]
        wrong = reply.replace("<CONCLUSION>", "<CONCLUSION> not")
        out.append(
            {
                "id": r["id"],
                "image": r["image"],
                "conversations": r["conversations"][:1],
                "chosen": reply,
                "rejected": wrong,
            }
        )
    return out


@pytest.fixture(scope="module")
def pairs_file(shapes):
    """A cotune pairs file beside the synthetic pictures (their folder is its image root)."""
    path = Path(shapes["train"]).parent / "dpo_pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in _gold_pairs(shapes, 8)))
    return path


def test_three_layouts_read_alike_and_bad_records_name_their_line(shapes, tmp_path):
    p = _gold_pairs(shapes, 1)[0]
    question = p["conversations"][0]["value"].replace("<image>\n", "")
    trl = {
        "images": [p["image"]],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}],
        "rejected": p["rejected"],  # TRL takes a plain string too
    }
    factory = {
        "conversations": p["conversations"],
        "chosen": {"from": "gpt", "value": p["chosen"]},
        "rejected": {"from": "gpt", "value": p["rejected"]},
        "images": [p["image"]],
    }
    bad = [
        {**p, "rejected": p["chosen"]},  # nothing to prefer
        {k: v for k, v in p.items() if k != "rejected"},
        {
            **p,
            "conversations": [*p["conversations"], {"from": "gpt", "value": "x"}],
        },  # prompt ends with a reply
        {**p, "image": [p["image"], p["image"]]},  # two images, one marker
    ]
    path = Path(shapes["train"]).parent / "layouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [p, trl, factory, *bad]) + "{oops\n")
    pairs, problems = read_pairs(path)
    assert len(pairs) == 3
    for chosen, rejected in pairs[1:]:  # the same conversations, whichever layout
        assert chosen.messages == pairs[0][0].messages and rejected.messages == pairs[0][1].messages
        assert chosen.images == pairs[0][0].images
    assert pairs[0][0].messages[-1]["content"][0]["text"] == p["chosen"]
    where = {pr.where: pr.reason for pr in problems}
    assert list(where) == [f"layouts.jsonl:{k}" for k in range(4, 9)]
    assert "same reply" in where["layouts.jsonl:4"] and "'rejected'" in where["layouts.jsonl:5"]
    assert "end with a user turn" in where["layouts.jsonl:6"] and "markers" in where["layouts.jsonl:7"]
    assert "invalid JSON" in where["layouts.jsonl:8"]


def test_pairs_from_attempts_pair_accepted_with_rejected_of_the_same_record(tmp_path):
    rows = [
        dict(id="a", attempt=0, image="x.png", question="Q?", answer="1", reply="right", accepted=True),
        dict(id="a", attempt=1, image="x.png", question="Q?", answer="1", reply="wrong", accepted=False),
        dict(id="a", attempt=2, image="x.png", question="Q?", answer="1", reply="wrong too", accepted=False),
        dict(id="b", attempt=0, image="y.png", question="Q?", answer="2", reply="only right", accepted=True),
    ]
    path = tmp_path / "out.attempts.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "why": "", "teacher": "t", "hinted": False}) + "\n" for r in rows)
    )
    pairs, problems = pairs_from_attempts(path, per_record=2)
    assert not problems
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "right", "wrong"),
        ("a#1", "right", "wrong too"),
    ]
    assert pairs[0]["conversations"] == [{"from": "human", "value": "<image>\nQ?"}]

    # the verb: an image outside the pairs file's folder is named by its absolute path; the file reads
    # back as training data with an image root that holds it
    from PIL import Image

    from cotune.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    out = tmp_path / "pairs" / "p.jsonl"
    assert (
        main(
            [
                "data",
                "pairs",
                str(path),
                "--source",
                "attempts",
                "--per_record",
                "2",
                "--pairs_file",
                str(out),
            ]
        )
        == 0
    )
    read, problems = read_pairs(out, image_root=str(tmp_path))
    assert (
        len(read) == 2
        and not problems
        and json.loads(out.read_text().splitlines()[0])["image"] == str(tmp_path / "x.png")
    )


def _reference_logps(model, inputs: dict) -> torch.Tensor:
    """Summed reply log-probs per row from the full logits of an HF forward (independent of cotune's loss)."""
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(-1)


def test_dpo_loss_and_rewards_equal_trl_formula_on_a_fixed_batch(base, processor, pairs_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, family = base
    torch.manual_seed(0)
    targets = family.resolve_lora_targets(model.config, "language")
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft.eval()
    pairs, _ = read_pairs(pairs_file)
    enc, _ = encode_pairs(pairs[:2], processor, family, 512, "drop")
    tok = processor.tokenizer
    batch = PairCollator(tok.pad_token_id, family, family.image_token_id(tok))(
        [PairDataset(enc, processor, family)[i] for i in range(2)]
    )
    assert batch["pairs"] == 2 and batch["input_ids"].shape[0] == 4
    inputs = family.model_inputs(batch)
    beta, w = 0.3, 0.5
    loss_sum, stats = DPO(peft, beta=beta, sft_weight=w).loss_sum(
        ChunkedLossModel(peft, family=family), inputs, batch
    )

    with torch.no_grad():
        pi = _reference_logps(peft, inputs)
        with peft.disable_adapter():
            ref = _reference_logps(peft, inputs)
    pc, pr, rc, rr = pi[:2], pi[2:], ref[:2], ref[2:]
    trl = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))  # TRL's sigmoid DPO loss
    n_chosen = (batch["labels"][:2, 1:] != -100).sum(-1)
    expected = trl + w * (-pc / n_chosen)
    assert float(loss_sum) == pytest.approx(float(expected.sum()), rel=1e-4)
    # a reward is beta x the difference of two fp32 sums of ~1e3 log-probs: ~1e-3 absolute error
    assert float(stats["rewards_chosen"]) == pytest.approx(
        float((beta * (pc - rc)).sum()), rel=1e-4, abs=2e-3
    )
    assert float(stats["rewards_rejected"]) == pytest.approx(
        float((beta * (pr - rr)).sum()), rel=1e-4, abs=2e-3
    )
    assert float(stats["rewards_accuracy"]) == float(((pc - rc) > (pr - rr)).sum())
    assert float(stats["logps_chosen"]) == pytest.approx(float(pc.sum()), rel=1e-5)
    assert (pc != rc).all()  # the adapter changes the log-probs: a real comparison

    # gradients: cotune's per-row loss equals autograd through the full logits
    loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    pi = _reference_logps(peft, inputs)
    (-F.logsigmoid(beta * ((pi[:2] - rc) - (pi[2:] - rr))) + w * (-pi[:2] / n_chosen)).sum().backward()
    errors = [
        float((ours[n] - p.grad).norm() / p.grad.norm())
        for n, p in peft.named_parameters()
        if p.requires_grad
    ]
    print(f"\ngradient relative error (chunked per-row loss vs full logits): max {max(errors):.1e}")
    assert max(errors) < 1e-3  # fp32 sums over the 128k vocabulary, in other orders

    # a frozen reference adapter beside the trained one: the reference pass is that adapter's
    saved = tmp_path / "ref"
    peft.save_pretrained(str(saved))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.01)
    attach_reference(peft, str(saved))
    assert all(p.requires_grad == (".default." in n) for n, p in peft.named_parameters() if "lora_" in n)
    loss_sum, stats = DPO(peft, beta=beta, reference="reference").loss_sum(
        ChunkedLossModel(peft, family=family), inputs, batch
    )
    with torch.no_grad():
        pi = _reference_logps(peft, inputs)
    expected = -F.logsigmoid(beta * ((pi[:2] - pc) - (pi[2:] - pr)))  # pc, pr: the saved adapter's log-probs
    assert float(loss_sum) == pytest.approx(
        float(expected.sum()), abs=1e-3
    )  # ~1e-3: differences of sums of ~1e3, as above
    peft.delete_adapter("reference")


def test_held_out_pairs_are_a_seeded_subset_read_as_held_out_samples_are(processor, pairs_file):
    from cotune.config import load_config
    from cotune.data.pair_batches import build_pair_data
    from cotune.models.families import MLLAMA

    options = [("method", "dpo"), ("dataset", str(pairs_file)), ("data.test_split_ratio", "0.5")]
    picked, reports = [], []
    for limit in ("3", "3", "0"):
        cfg = load_config(None, [*options, ("data.val_max_samples", limit), ("batch_size_training", "1")])
        data = build_pair_data(cfg, processor, MLLAMA, log=lambda s: None)
        picked.append([b["input_ids"][0].tolist() for b in data.val])
        reports.append(data.report)
    assert "validation on a seeded subset of 3 of the 4 held-out pairs" in " ".join(reports[0])
    assert "validation on all 4 held-out pairs" in " ".join(reports[2])
    assert len(picked[0]) == 3 and picked[0] == picked[1] and len(picked[2]) == 4  # the same 3 each run
    assert all(row in picked[2] for row in picked[0])


def test_data_check_reads_a_pairs_file_as_dpo_training_does(processor, pairs_file, tmp_path, capsys):
    from cotune.cli import main
    from cotune.config import load_options
    from cotune.data.check import check_data
    from cotune.data.pair_batches import encode_pairs
    from cotune.models.families import MLLAMA

    good = pairs_file.read_text().splitlines()
    first = json.loads(good[0])
    bad = [
        "{not json",
        json.dumps({k: v for k, v in first.items() if k != "rejected"}),
        json.dumps(dict(first, image="nowhere.png")),
        json.dumps(dict(first, rejected=first["rejected"] + " word" * 300)),  # too long on one side
    ]
    path = pairs_file.parent / "messy_pairs.jsonl"
    path.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    cfg = load_options("data", overrides=[("data.max_seq_len", "400")]).options
    report = check_data(cfg, path, processor, MLLAMA, log=lambda s: None)
    pairs, problems = read_pairs(path)  # what training reads, then tokenizes
    encoded, token_problems = encode_pairs(pairs, processor, MLLAMA, 400, "drop")
    assert [str(p) for p in report.problems] == sorted(
        map(str, problems + token_problems), key=lambda s: int(s.split(":")[1])
    )
    assert [p.where.split(":")[1] for p in report.problems] == ["4", "5", "6", "7"] and report.usable == len(
        encoded
    ) == 8
    assert report.records == 12 and len(report.lengths) == 8 and min(report.label_tokens) > 0
    assert main(["data", "check", str(pairs_file)]) == 0  # the clean file passes
    out = capsys.readouterr().out
    assert "preference pairs" in out and "result: OK" in out


def _flags(model, pairs, out: Path, steps: int, **extra) -> list[str]:
    flags = {
        "model_name": model, "dataset": pairs, "output_dir": out, "method": "dpo", "beta": 0.1,
        "batch_size_training": 2, "max_train_step": steps, "data.max_seq_len": 512, "data.test_split_ratio": 0.25,
        "lora_config.lora_dropout": 0.0, "lr": 1e-3, "scheduler": "constant", "eval_every_steps": 2,
        "save_every_steps": 2, "keep_last_checkpoints": 3, "progress": False, "num_epochs": 2, **extra,
    }  # fmt: skip
    return [f"--{k}={v}" for k, v in flags.items()]


def _rows(run: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def dpo_run(tiny_mllama, pairs_file, tmp_path_factory):
    """4 uninterrupted DPO steps (6 micro-batches over 2 epochs, accumulation 2) from a fresh adapter, the base as the reference."""
    out = tmp_path_factory.mktemp("dpo") / "full"
    _in_process(_flags(tiny_mllama, pairs_file, out, 6, gradient_accumulation_steps=2))
    return out


def test_first_step_is_ln2_the_run_learns_and_logs_rewards(dpo_run):
    steps = _rows(dpo_run, "loss")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 2 epochs of 3 batches, groups of 2
    assert steps[0]["loss"] == pytest.approx(LN2, rel=1e-6)  # the adapter starts equal to its reference
    assert steps[0]["rewards_margin"] == 0.0
    evals = _rows(dpo_run, "eval_loss")
    assert evals[0]["eval_loss"] == pytest.approx(LN2, rel=1e-6) and evals[-1]["eval_loss"] < 0.6
    assert evals[-1]["eval_rewards_accuracy"] == 1.0 and evals[-1]["eval_rewards_margin"] > 0
    for key in ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "logps_chosen", "logps_rejected"):
        assert key in steps[-1]
    assert set(_adapter(dpo_run)) == set(_adapter(dpo_run, "best_adapter"))


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_one_does(dpo_run, tiny_mllama, pairs_file, tmp_path):
    out = tmp_path / "resumed"
    _in_process(_flags(tiny_mllama, pairs_file, out, 5, gradient_accumulation_steps=2))  # ends in epoch 1
    _in_process(_flags(tiny_mllama, pairs_file, out, 6, gradient_accumulation_steps=2, resume="auto"))
    a, b = _rows(out, "loss"), _rows(dpo_run, "loss")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-9)
    _assert_same_adapter(_adapter(out), _adapter(dpo_run), atol=0)


def test_dpo_from_an_adapter_against_itself_starts_at_ln2(dpo_run, tiny_mllama, pairs_file, tmp_path):
    sft = dpo_run / "adapter"
    out = tmp_path / "from_sft"
    _in_process(_flags(tiny_mllama, pairs_file, out, 2, from_peft_checkpoint=sft, ref_adapter=sft))
    first = _rows(out, "loss")[0]
    assert first["loss"] == pytest.approx(LN2, rel=1e-6)
    assert _rows(out, "eval_loss")[0]["eval_loss"] == pytest.approx(LN2, rel=1e-6)
    saved = _adapter(out)
    assert saved and not any("reference" in k for k in saved)  # the frozen reference is not saved
    assert not (out / "adapter" / "reference").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tiny_mllama, pairs_file, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "cotune", "train", "--enable_fsdp", "--nproc_per_node=2"]
    done = _run(cmd + _flags(tiny_mllama, pairs_file, two, 3, batch_size_training=1), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    _in_process(_flags(tiny_mllama, pairs_file, one, 3, batch_size_training=2))
    m2, m1 = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [sorted(r) for r in m2] == [sorted(r) for r in m1]
    for a, b in zip(m2, m1):
        for k in a:
            if k.startswith(("loss", "eval_", "rewards", "logps")):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-3), (k, a, b)
    _assert_same_adapter(_adapter(two), _adapter(one), atol=1e-5)


def test_on_policy_pairs_pair_right_with_wrong_and_skip_records_without_both(shapes):
    from cotune.data.records import load_samples
    from cotune.infer.pairs import pairs_of_replies, reply_is_right

    sample = load_samples(shapes["train"])[0][0]
    gold_reply = next(m for m in sample.messages if m["role"] == "assistant")["content"][0]["text"]
    gold = sample.meta["answer"]
    wrong = gold_reply.replace(f"<CONCLUSION> {gold}", "<CONCLUSION> nothing")
    broken = gold_reply.replace("<CAPTION>", "")  # right answer, format broken: wrong
    assert (
        reply_is_right(gold_reply, gold)
        and not reply_is_right(wrong, gold)
        and not reply_is_right(broken, gold)
    )
    pairs = pairs_of_replies(sample, [gold_reply, wrong, broken, gold_reply], per_record=3)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(gold_reply, wrong), (gold_reply, broken)]
    assert pairs[0]["right"] == 1 and pairs[0]["sampled"] == 4
    assert pairs_of_replies(sample, [gold_reply, gold_reply], per_record=3) == []
    # the record's own reply as the chosen one: every wrong sample gets a pair, even with no right one
    pairs = pairs_of_replies(sample, [wrong, broken, wrong], per_record=3, chosen="reference")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(gold_reply, wrong), (gold_reply, broken)]


def test_stage_pairs_differ_in_one_stage_and_need_a_right_search(shapes):
    from cotune.data.cot import parse_stages
    from cotune.data.records import load_samples
    from cotune.infer.pairs import stage_pairs_of

    sample = load_samples(shapes["train"])[0][0]
    gold = sample.meta["answer"]
    stage = lambda name, text: f"<{name}> {text} </{name}>\n\n"  # noqa: E731
    steps = [
        dict(stage="SUMMARY", candidates=[stage("SUMMARY", "plan"), stage("SUMMARY", "plan")], valid=[True, True], winner=0),
        dict(stage="CAPTION", candidates=[stage("CAPTION", "bad"), stage("CAPTION", "good"), "no tags"], valid=[True, True, False], winner=1),
        dict(stage="REASONING", candidates=[stage("REASONING", "so")], valid=[True], winner=0),
        dict(stage="CONCLUSION", candidates=[f"<CONCLUSION> {gold} </CONCLUSION>", "<CONCLUSION> nope </CONCLUSION>"], valid=[True, True], winner=0),
    ]  # fmt: skip
    pairs = stage_pairs_of(sample, steps, per_record=4)
    assert [p["stage"] for p in pairs] == ["CAPTION", "CONCLUSION"]  # SUMMARY's loser equals its winner
    for p in pairs:
        c, r = parse_stages(p["chosen"]), parse_stages(p["rejected"])
        assert [s for s in c if c[s] != r[s]] == [p["stage"]]
    assert parse_stages(pairs[0]["rejected"])["CAPTION"] == "bad"
    steps[3]["winner"] = 1  # the search ended wrong: no pair teaches its chain
    assert stage_pairs_of(sample, steps, per_record=4) == []
