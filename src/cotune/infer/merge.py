"""``cotune merge``: fold a LoRA adapter into its base and save a standard Hugging Face checkpoint.

The result (sharded safetensors + ``config.json`` + the processor) loads with
``AutoModelForImageTextToText.from_pretrained(dir)`` and needs neither PEFT nor cotune.

Memory: the base is loaded once, in the chosen dtype (bf16 works on CPU); PEFT's
``merge_and_unload`` then folds each LoRA layer into its weight in place, module by module (the only
extra memory is one layer's ``B @ A``), and the checkpoint is written shard by shard
(``max_shard_size``). Peak memory is one copy of the model plus one shard.

Parity: before merging, the adapter's logits on a sample (a record of ``--data``, else a generated
image with a short question) are kept; after merging, the merged model's logits on the same input
must match within a tolerance that suits the dtype (``atol + rtol * max|logits|``); otherwise
nothing is written.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cotune.files import atomic_dir
from cotune.infer.adapters import check_adapter_dir
from cotune.infer.generate import model_device_dtype, user_message
from cotune.models.load import DTYPES, load_base_model, load_processor

# (atol, rtol) of the parity check per dtype, against max|logits|: W + BA is rounded to the weight
# dtype once, where the adapter adds B(Ax) separately, and the difference grows through the layers
# (and through the image path, where the cross-attention gates are open). Measured in bf16 on the
# tiny model with open gates: a correct merge differs by 3.5-5.3% of max|logits| (0.59-0.94 at 17.7);
# a wrong merge (lost scaling, a layer missed) moves logits by about the adapter's own effect (25
# there), and losing 5% of one layer's update is still caught (tests/test_merge.py).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 8e-2), torch.float16: (1e-2, 5e-3)}


class MergeMismatch(ValueError):
    """The merged model's logits differ from the adapter's by more than the tolerance."""


@dataclass
class MergeReport:
    """What a merge produced and measured."""

    output_dir: Path
    dtype: str
    max_abs_diff: float
    tolerance: float
    adapter_effect: float  # max |adapter - base| logits: the merge must keep this, not lose it
    top1_agreement: float
    model_bytes: int
    rss_before_load: int
    peak_rss: int
    shards: int
    seconds: float

    def describe(self) -> str:
        mib = 2**20
        return (
            f"merged model written to {self.output_dir} ({self.shards} shard{'s' if self.shards != 1 else ''}, "
            f"{self.dtype})\n"
            f"parity: max |merged - adapter| logits = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}); "
            f"the adapter moves the base's logits by up to {self.adapter_effect:.3g}; "
            f"top-1 token agreement {self.top1_agreement:.1%}\n"
            f"memory: model {self.model_bytes / mib:,.0f} MiB; process RSS {self.rss_before_load / mib:,.0f} MiB "
            f"before loading, peak {self.peak_rss / mib:,.0f} MiB "
            f"(peak - before = {(self.peak_rss - self.rss_before_load) / max(self.model_bytes, 1):.2f} x model)"
        )


def _rss_now() -> int:
    """This process's resident memory in bytes (0 where /proc is not available)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if peak > 2**32 else peak * 1024  # Linux reports KiB, macOS bytes


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype the checkpoint's config.json records ('fp32' when it records none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "fp32"


# Records tried, in order, for the parity sample.
PARITY_TRIES = 8


def parity_sample(processor: Any, family: Any, data: str = "", data_options: Any = None) -> dict:
    """The sample the parity check runs on: the first record of ``data`` (prompt and reference
    reply), else a generated 64x64 image with a short question.

    ``data_options`` (the ``data`` section of ``cotune.config``) reads and renders the file as
    training does (format, columns, image root, system prompt, on_error, max_seq_len, overlength);
    without it, the file is read with the defaults and no length limit.
    """
    from PIL import Image

    from cotune.infer.generate import encode_prompt

    if data:
        from cotune.data.dataset import encode_samples
        from cotune.data.images import load_image
        from cotune.data.records import load_samples, report_problems

        d = data_options
        if d is None:
            samples, _ = load_samples(data)
            max_seq_len, overlength = 100_000, "drop"
        else:
            samples, problems = load_samples(
                data, d.image_root, d.system_prompt, fmt=d.format, columns=d.columns,
                workers=d.image_workers, image_check=d.image_check,
            )  # fmt: skip
            report_problems(problems, d.on_error, len(samples) + len(problems), log=lambda _: None)
            max_seq_len, overlength = d.max_seq_len, d.overlength
        # the first record that renders within the limit (a few are tried, not the whole file)
        encoded, _, _ = encode_samples(samples[:PARITY_TRIES], processor, family, max_seq_len, overlength)
        if encoded:
            item = {"input_ids": torch.tensor(encoded[0].input_ids)}
            if encoded[0].images:
                images = [load_image(ref) for ref in encoded[0].images]
                item.update(family.image_inputs(processor, [images]))
            return item
    pixels = bytes((x * 4 + y * 2) % 256 for y in range(64) for x in range(64) for _ in range(3))
    image = Image.frombytes("RGB", (64, 64), pixels)
    messages = [user_message("Describe the image step by step.", n_images=1)]
    return encode_prompt(processor, family, messages, [image])


@torch.no_grad()
def _logits(model: torch.nn.Module, processor: Any, family: Any, item: dict) -> torch.Tensor:
    from cotune.data.batching import PaddingCollator, to_device

    tokenizer = processor.tokenizer
    collate = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    item = {**item, "labels": torch.full_like(item["input_ids"], -100)}
    batch = collate([item])
    batch.pop("labels")
    device, dtype = model_device_dtype(model)
    return model(**to_device(batch, device, float_dtype=dtype), use_cache=False).logits.float().cpu()


def merge_adapter(
    model_name: str,
    adapter_dir: str,
    output_dir: str,
    dtype: str = "",
    max_shard_size: str = "2GB",
    data: str = "",
    tolerance: float = 0.0,
    tokenizer_name: str = "",
    log=print,
    data_options: Any = None,
    quantization: str = "",
    quantization_config: Any = None,
    into: str = "dequantized",
) -> MergeReport:
    """Merges ``adapter_dir`` into ``model_name`` and saves the result to ``output_dir``.

    Args:
        model_name: the base checkpoint directory.
        adapter_dir: a PEFT adapter directory trained on that base.
        output_dir: where the merged checkpoint goes (replaced atomically).
        dtype: weights dtype of the merge and of the saved checkpoint (default: the base's own).
        max_shard_size: largest safetensors shard, e.g. "2GB" (bounds the memory of saving).
        data: a data file whose first record is the parity sample (default: a generated image).
        tolerance: maximum allowed |merged - adapter| logits (0: by dtype, see ``TOLERANCES``).
        tokenizer_name: processor directory if different from ``model_name``.
        log: where the report goes.
        data_options: the ``data`` section that reads ``data`` (see ``parity_sample``).
        quantization: '4bit' for a QLoRA adapter: the reference is the 4-bit base with the adapter (what
            it was trained against), and the adapter is merged into that base dequantized to ``dtype``
            (merged into the original base instead, the difference is the base's own quantization
            error, as large as the adapter's effect: no guard could tell a wrong merge from it).
        quantization_config: the ``QuantizationConfig`` the adapter was trained with.
        into: with ``quantization``, 'dequantized' (above) or 'original': the full-precision base, checked
            against the original base + adapter; the 4-bit model's difference is logged as information.

    Raises:
        MergeMismatch: the merged model does not reproduce the adapter (nothing is written).
    """
    start, rss_before = time.perf_counter(), _rss_now()
    check_adapter_dir(adapter_dir)
    if quantization not in ("", "4bit"):
        raise ValueError(f"merge takes --quantization 4bit (a QLoRA adapter) or none; got '{quantization}'")
    dtype = dtype or checkpoint_dtype(model_name)
    processor = load_processor(tokenizer_name or model_name)
    model, base, family, item, expected, base_logits = _reference(
        model_name, adapter_dir, dtype, processor, (data, data_options), quantization, quantization_config, into, log,
    )  # fmt: skip
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    log(f"merging {adapter_dir} into {model_name} ({dtype}) ...")
    merged = model.merge_and_unload()  # each LoRA layer folded into its weight in place
    got = _logits(merged, processor, family, item)
    checks = _check(got, expected, base_logits, dtype, tolerance, output_dir)
    shards = _save(merged, processor, output_dir, max_shard_size)
    report = MergeReport(Path(output_dir), dtype, **checks, model_bytes=model_bytes, rss_before_load=rss_before,
                         peak_rss=_peak_rss(), shards=shards, seconds=time.perf_counter() - start)  # fmt: skip
    log(report.describe())
    return report


def _save(merged: torch.nn.Module, processor: Any, output_dir, max_shard_size: str) -> int:
    """Writes the merged checkpoint and the processor to ``output_dir`` atomically; the shard count."""
    with atomic_dir(output_dir) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        processor.save_pretrained(str(tmp))
    return len(list(Path(output_dir).glob("*.safetensors")))


def _check(got, expected, base_logits, dtype: str, tolerance: float, output_dir) -> dict:
    """How the merged model's logits ``got`` match the adapter's ``expected``; raises ``MergeMismatch``
    past the tolerance (``tolerance``, or by ``dtype``: ``TOLERANCES``)."""
    diff = float((got - expected).abs().max())
    atol, rtol = TOLERANCES[DTYPES[dtype]]
    limit = tolerance or atol + rtol * float(expected.abs().max())
    if not diff <= limit:
        raise MergeMismatch(
            f"merged logits differ from the adapter's by {diff:.3g} > tolerance {limit:.3g} ({dtype}); "
            f"nothing written to {output_dir}"
        )
    return dict(
        max_abs_diff=diff,
        tolerance=limit,
        adapter_effect=float((expected - base_logits).abs().max()),
        top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    )


def _reference(
    model_name, adapter_dir, dtype, processor, sample, quantization, quantization_config, into, log
):
    """The model to merge (base + adapter, PEFT), its base, family, the parity sample, and the logits the
    merge must reproduce (the adapter's) and the base's, as ``merge_adapter``'s arguments ask."""
    from peft import PeftModel

    torch_dtype = DTYPES[dtype]
    base, family = load_base_model(
        model_name, torch_dtype, quantization=quantization, quantization_config=quantization_config
    )
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
    item = parity_sample(processor, family, *sample)  # sample: (data, data_options)
    expected = _logits(model, processor, family, item)
    with model.disable_adapter():
        base_logits = _logits(model, processor, family, item)
    if quantization and into == "original":  # the usual deployment: the reference is the original base's
        quantized_logits = expected
        del model, base
        base, family = load_base_model(model_name, torch_dtype)
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
        expected = _logits(model, processor, family, item)
        with model.disable_adapter():
            base_logits = _logits(model, processor, family, item)
        log(
            f"information: the original base + adapter differs from the 4-bit base + adapter by "
            f"{float((expected - quantized_logits).abs().max()):.3g} (max |logits|): the base's quantization error"
        )
    elif quantization:  # the same adapter on the 4-bit base dequantized: a plain checkpoint to merge into
        base = model.unload().dequantize()
        log(f"{model_name}: 4-bit base dequantized to {dtype}")
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
    return model, base, family, item, expected, base_logits
