"""Data benchmark: does the data pipeline keep up with training, and how much padding is left?

Writes the synthetic LLaVA-CoT dataset with photo-sized JPEGs (640x640) and a tiny random Mllama,
then measures, on this machine:

* pad fraction of the training batches: padding in random order, padding with length grouping,
  and packing (``batching_strategy: packing``);
* training-step throughput of the tiny model (LoRA, chunked loss, AdamW) with padded and packed
  batches: samples/s and real tokens/s;
* the data pipeline alone (JPEG decode, optional augmentation, Mllama image processor, collation)
  in DataLoader workers with prefetch: samples/s with the tiny model's processor (32 px tiles) and
  with Llama-3.2-11B-Vision's image processing (560 px tiles, up to 4), augmentation off and on;
* the pre-training image check (``cotune data check``): images/s with 1 and 4 threads.

It ends with the verdict: which of the pipeline and the training step is the bottleneck.

Usage:
    python bench/data.py [--n 400] [--workers 2] [--batch-size 4] [--context-length 1024] [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cotune.config import AugmentConfig, LoraConfig  # noqa: E402
from cotune.data.augment import Augmenter  # noqa: E402
from cotune.data.batching import (  # noqa: E402
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    PackingCollator,
    PaddingCollator,
    packed_pad_fraction,
    pad_fraction,
)
from cotune.data.dataset import SFTDataset, encode_samples  # noqa: E402
from cotune.data.records import check_sample_images, load_samples  # noqa: E402
from cotune.demo.synthetic import write_synthetic_dataset  # noqa: E402
from cotune.demo.tiny import build_tiny_mllama  # noqa: E402
from cotune.models.families import MLLAMA  # noqa: E402
from cotune.models.load import add_lora, load_base_model, load_processor  # noqa: E402
from cotune.train.loss import ChunkedLossModel  # noqa: E402


def jpeg_dataset(root: Path, n: int) -> Path:
    """The shapes dataset with its PNGs re-encoded as JPEG (quality 90), as photo datasets ship."""
    paths = write_synthetic_dataset(root, n_train=n, n_test=1, image_size=640)
    lines = []
    for line in paths["train"].read_text().splitlines():
        rec = json.loads(line)
        png = root / rec["image"]
        rec["image"] = rec["image"].replace(".png", ".jpg")
        Image.open(png).convert("RGB").save(root / rec["image"], quality=90)
        lines.append(json.dumps(rec))
    out = root / "train_jpeg.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def eleven_b_processor(processor):
    """The tiny processor with Llama-3.2-11B-Vision's image processing (560 px tiles, up to 4)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    big = copy.copy(processor)
    big.image_processor = MllamaImageProcessorPil(
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return big


def pipeline_rate(encoded, processor, workers: int, batch_size: int, augment=None, limit: int = 0) -> float:
    """Samples/s of decode + augment + image processor + collate through a DataLoader."""
    ds = SFTDataset(encoded[:limit] if limit else encoded, processor, MLLAMA, augment=augment)
    tok = processor.tokenizer
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=LengthGroupedBatchSampler(ds.lengths, batch_size, seed=0, keys=True),
        collate_fn=PaddingCollator(tok.pad_token_id, MLLAMA, MLLAMA.image_token_id(tok)),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    it = iter(loader)
    first = next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch["input_ids"].shape[0]
    del first
    return n / (time.perf_counter() - start)


def step_rate(model, batches: list[dict]) -> tuple[float, float]:
    """(samples/s, real tokens/s) of LoRA training steps on ready batches (the first is warm-up)."""
    loss_model = ChunkedLossModel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    drop = ("token_mask", "samples_per_row", "where")

    def step(batch):
        loss_sum, n = loss_model(**{k: v for k, v in batch.items() if k not in drop})
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    samples = tokens = 0
    for batch in batches[1:]:
        step(batch)
        samples += sum(batch.get("samples_per_row", [1] * batch["input_ids"].shape[0]))
        tokens += int(batch.get("attention_mask", batch.get("token_mask")).sum())
    seconds = time.perf_counter() - start
    return samples / seconds, tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="training samples")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6, help="measured training steps (+1 warm-up)")
    ap.add_argument("--pipeline-samples", type=int, default=200, help="samples through the pipeline")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cotune-data-bench-"))
    torch.manual_seed(0)
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    model_dir = build_tiny_mllama(work / "tiny", seed=0)
    data = jpeg_dataset(work / "data", args.n)
    processor = load_processor(model_dir)
    start = time.perf_counter()
    samples, problems = load_samples(data, workers=4)
    load_s = time.perf_counter() - start
    encoded, _, _ = encode_samples(samples, processor, MLLAMA, max_seq_len=2048)
    lengths = [len(e.input_ids) for e in encoded]
    for threads in (1, 4):
        start = time.perf_counter()
        check_sample_images(samples, workers=threads)
        rate = len(samples) / (time.perf_counter() - start)
        print(f"image check (640x640 JPEG, full decode): {rate:,.0f} images/s with {threads} thread(s)")
    print(f"read + validate {len(samples)} records: {len(samples) / load_s:,.0f} records/s")

    # ---- padding
    b, c = args.batch_size, args.context_length
    plain = pad_fraction(
        lengths, LengthGroupedBatchSampler(lengths, b, seed=0, group_by_length=False).global_batches()
    )
    grouped = pad_fraction(lengths, LengthGroupedBatchSampler(lengths, b, seed=0).global_batches())
    packer = PackedBatchSampler(lengths, b, c, seed=0, has_images=[True] * len(lengths))
    packed = packed_pad_fraction(lengths, packer.global_batches())
    rows = sum(len(x) for x in packer.global_batches())
    print(
        f"tokens per sample: mean {sum(lengths) / len(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; "
        f"batch {b}, context_length {c}"
    )
    print(f"pad fraction: padding {plain:.1%}, padding + length grouping {grouped:.1%}, packing {packed:.1%}")
    print(f"packing: {len(lengths)} samples in {rows} rows ({len(lengths) / rows:.1f} samples per row)")

    # ---- training step
    model, _ = load_base_model(model_dir)
    model = add_lora(model, MLLAMA, LoraConfig(r=8, lora_dropout=0.0))
    model.train()
    tok = processor.tokenizer
    ds = SFTDataset(encoded, processor, MLLAMA)
    image_id = MLLAMA.image_token_id(tok)
    pad_batches = [
        PaddingCollator(tok.pad_token_id, MLLAMA, image_id)([ds[k] for k in keys])
        for keys in list(LengthGroupedBatchSampler(lengths, b, seed=0, keys=True))[: args.steps + 1]
    ]
    # about as many samples per packed batch as per padded batch, so the step times compare
    rows_per_batch = max(1, round(b * rows / len(lengths)))
    step_packer = PackedBatchSampler(lengths, rows_per_batch, c, seed=0, has_images=[True] * len(lengths))
    pack_batches = [
        PackingCollator(tok.pad_token_id, MLLAMA, image_id)([ds[k] for k in keys])
        for keys in list(step_packer)[: args.steps + 1]
    ]
    pad_sps, pad_tps = step_rate(model, pad_batches)
    pack_sps, pack_tps = step_rate(model, pack_batches)
    print(f"training step, tiny model, padding (grouped): {pad_sps:.1f} samples/s, {pad_tps:,.0f} tokens/s")
    print(f"training step, tiny model, packing:           {pack_sps:.1f} samples/s, {pack_tps:,.0f} tokens/s")

    # ---- pipeline alone
    aug = Augmenter(AugmentConfig(enabled=True), seed=0)
    big = eleven_b_processor(processor)
    n = args.pipeline_samples
    rates = {}
    for name, proc in (("tiny (32 px tiles)", processor), ("11B (560 px tiles)", big)):
        for label, augment in (("off", None), ("on", aug)):
            for workers in sorted({0, args.workers}):
                rate = pipeline_rate(encoded, proc, workers, b, augment, limit=n)
                rates[(name, label, workers)] = rate
                print(
                    f"data pipeline, {name}, augmentation {label}, {workers} workers: {rate:,.1f} samples/s"
                )
    tiny_rate = rates[("tiny (32 px tiles)", "off", args.workers)]
    bottleneck = "the training step" if tiny_rate > pad_sps else "the data pipeline"
    print(
        f"verdict (tiny model): pipeline {tiny_rate:,.1f} samples/s with {args.workers} workers vs "
        f"{pad_sps:.1f} samples/s consumed by a training step: the bottleneck is {bottleneck} "
        f"({max(tiny_rate, pad_sps) / min(tiny_rate, pad_sps):.1f}x)"
    )
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
