"""The self-improvement loop, measured once: SFT adapter -> pairs from its own samples -> DPO.

On the embedded world (the demo's tiny Mllama and synthetic shapes), the held-out task is the demo's
yes/no presence question ("Is there a circle in the image?"), which the demo's SFT leaves near
chance while it reads colour and outline right. The script:

1. takes the demo's SFT adapter (``cotune demo --workdir W``: W/run/adapter), or trains it;
2. writes a presence-only data set from another seed (training records to sample on, held-out
   questions to score);
3. samples ``--n`` replies of the SFT adapter per training record and pairs right with wrong ones
   (``cotune.infer.pairs.on_policy_pairs``: what ``cotune data pairs --source samples`` runs);
4. trains DPO from the SFT adapter with the SFT adapter as the frozen reference
   (``cotune train --method dpo --from_peft_checkpoint SFT --ref_adapter SFT``);
5. answers the held-out questions greedily with both adapters, with the true pictures, pictures
   shuffled across questions and blank pictures (``cotune eval --image_ablation``'s figures).

Run once (it is not a test): ``python bench/dpo_loop.py --workdir /tmp/dpo_bench``; the figures go to
WORKDIR/dpo_loop.json and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from cotune.config import load_config
from cotune.data.records import load_samples
from cotune.demo.synthetic import write_synthetic_dataset
from cotune.eval.evaluate import evaluate_models
from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
from cotune.infer.pairs import build_pairs, on_policy_pairs
from cotune.run_demo import DEMO_CONFIG, DEMO_DATA, prepare_demo
from cotune.train.loop import finetune


def sft_adapter(workdir: Path, log=print) -> tuple[Path, Path]:
    """(tiny model dir, the demo's SFT adapter), trained with the demo's recipe unless already there."""
    model_dir, data_dir = prepare_demo(workdir, log=log)
    adapter = workdir / "run" / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        paths = [
            ("model_name", str(model_dir)), ("dataset", str(data_dir / "train.jsonl")),
            ("data.test_file", str(data_dir / "test.jsonl")), ("output_dir", str(workdir / "run")),
            ("progress", "False"),
        ]  # fmt: skip
        finetune(load_config(DEMO_CONFIG, paths), log=log)
    return model_dir, adapter


def presence_data(workdir: Path, n_train: int, n_test: int) -> dict:
    """Presence questions only, from another seed than the demo's data (new pictures)."""
    out = workdir / "presence"
    recipe = {**DEMO_DATA, "tasks": ("exists",), "n_train": n_train}
    if not (out / "test.jsonl").is_file():
        write_synthetic_dataset(out, n_test=n_test, seed=7, **recipe)
    return {"train": out / "train.jsonl", "test": out / "test.jsonl", "dir": out}


def make_pairs(model_dir: Path, sft: Path, train_file: Path, out: Path, args, log=print) -> int:
    """Pairs from the SFT adapter's own samples on the training records (right vs wrong)."""
    if out.is_file():
        return sum(1 for _ in open(out))
    model, processor, family = load_model_with_adapters(str(model_dir), [AdapterSpec("sft", str(sft))])
    samples, _ = load_samples(train_file)
    chunks = functools.partial(
        on_policy_pairs, model, processor, family, samples, n=args.n, per_record=args.per_record,
        batch_size=args.batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0, seed=0,
    )  # fmt: skip
    _, n = build_pairs(out, lambda skip: chunks(skip=skip), -(-len(samples) // args.batch), log=log)
    return n


def rechoose(pairs_file: Path, train_file: Path, out: Path) -> int:
    """The pairs of ``pairs_file`` with each record's own reply as the chosen one (the same sampled
    wrong replies; ``cotune data pairs --chosen reference`` without sampling again)."""
    from cotune.data.pairs import write_jsonl
    from cotune.infer.pairs import reference_reply

    by_id = {s.id: s for s in load_samples(train_file)[0]}
    seen, records = set(), []
    for line in open(pairs_file):
        p = json.loads(line)
        rid = p["id"].split("#")[0]
        ref = reference_reply(by_id[rid])
        if p["rejected"].strip() in seen or p["rejected"].strip() == ref.strip():
            continue
        seen.add(p["rejected"].strip())
        records.append({**p, "chosen": ref, "chosen_from": "reference"})
    write_jsonl(out, records)
    return len(records)


def train_dpo(model_dir: Path, sft: Path, pairs: Path, run: Path, args, log=print) -> Path:
    """DPO from the SFT adapter, the SFT adapter as the frozen reference."""
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return run / "adapter"
    opts = {
        "model_name": model_dir, "dataset": pairs, "output_dir": run, "method": "dpo", "beta": args.beta,
        "dpo_sft_weight": args.sft_weight, "from_peft_checkpoint": sft, "ref_adapter": sft, "lr": args.lr,
        "scheduler": "cosine", "warmup_steps": 5, "num_epochs": args.epochs, "batch_size_training": 2,
        "gradient_clipping": True, "data.test_split_ratio": 0.1, "data.max_seq_len": 512,
        "progress": False, "keep_last_checkpoints": 1, "seed": 42,
    }  # fmt: skip
    result = finetune(load_config(None, [(k, str(v)) for k, v in opts.items()]), log=log)
    return result.adapter_dir


def held_out(model_dir: Path, adapters: dict[str, Path], test_file: Path, n: int) -> dict:
    """Greedy answers of each adapter on the held-out questions: true, shuffled and blank pictures."""
    specs = [AdapterSpec(name, str(path)) for name, path in adapters.items()]
    model, processor, family = load_model_with_adapters(str(model_dir), specs)
    samples, _ = load_samples(test_file)
    results = evaluate_models(
        model, processor, family, samples[:n], list(adapters), batch_size=20, max_new_tokens=200,
        image_conditions=("true", "shuffled", "blank"),
    )  # fmt: skip
    keys = ("accuracy", "accuracy_shuffled_images", "accuracy_blank_images", "format_rate", "loss")
    return {name: {k: m.get(k) for k in keys} for name, m in results["models"].items()}


def table(figures: dict) -> str:
    rows = [
        "| adapter | accuracy, true / shuffled / blank pictures | four-stage format | loss |",
        "|---|---|---|---|",
    ]
    for name, m in figures["held_out"].items():
        acc = " / ".join(
            f"{m[k]:.0%}" for k in ("accuracy", "accuracy_shuffled_images", "accuracy_blank_images")
        )
        rows.append(f"| {name} | {acc} | {m['format_rate']:.0%} | {m['loss']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/dpo_bench/demo")
    p.add_argument("--records", type=int, default=64, help="presence training records sampled on")
    p.add_argument("--n", type=int, default=4, help="replies sampled per record")
    p.add_argument("--per_record", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="records per generation batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=120, help="per sample (a presence reply is ~90)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft_weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n_eval", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="dpo", help="names the pairs file and the DPO run (variants)")
    p.add_argument(
        "--pairs", default="", help="an existing pairs file (beside the pictures) instead of sampling"
    )
    p.add_argument("--rechoose", action="store_true", help="with --pairs: the records' own replies as chosen")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0, work = time.perf_counter(), Path(args.workdir)
    model_dir, sft = sft_adapter(work)
    data = presence_data(work, args.records, args.n_eval)
    pairs = Path(args.pairs) if args.pairs else data["dir"] / f"pairs_{args.tag}.jsonl"  # beside the pictures
    if args.rechoose:
        source, pairs = pairs, data["dir"] / f"pairs_{args.tag}.jsonl"
        n_pairs = rechoose(source, data["train"], pairs)
    else:
        n_pairs = make_pairs(model_dir, sft, data["train"], pairs, args)
    t_pairs = time.perf_counter() - t0
    print(f"{n_pairs} pairs from {args.records} records x {args.n} samples ({t_pairs:.0f} s)")
    dpo = train_dpo(model_dir, sft, pairs, work / f"run_{args.tag}", args)
    figures = {
        "args": vars(args),
        "pairs": n_pairs,
        "held_out": held_out(model_dir, {"sft": sft, "dpo": dpo}, data["test"], args.n_eval),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (work / f"dpo_loop_{args.tag}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
