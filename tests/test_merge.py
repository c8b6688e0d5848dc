"""Merging: the merged checkpoint reproduces the adapter and loads with plain transformers."""

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from cotune.cli import main
from cotune.infer.merge import TOLERANCES, MergeMismatch, merge_adapter, parity_sample
from cotune.models.load import DTYPES, load_base_model
from helpers import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_mllama, tmp_path_factory):
    """A LoRA adapter on the language and cross-attention layers with random B matrices."""
    out = tmp_path_factory.mktemp("merge") / "adapter"
    return make_adapter(tiny_mllama, out, seed=5, targets="language+cross_attention", std=0.1)


def _logits(model, processor, family, item):
    from cotune.infer.merge import _logits as logits

    return logits(model, processor, family, item)


def test_merged_checkpoint_matches_the_adapter_and_loads_without_cotune(
    tiny_mllama, adapter, processor, shapes, tmp_path
):
    out = tmp_path / "merged"
    data = str(shapes["test"])
    report = merge_adapter(
        str(tiny_mllama), adapter, str(out), dtype="fp32", max_shard_size="20MB", data=data
    )
    assert report.max_abs_diff <= report.tolerance and report.adapter_effect > 100 * report.max_abs_diff
    # a standard sharded checkpoint + processor, nothing cotune- or PEFT-specific
    assert report.shards > 1 and (out / "model.safetensors.index.json").is_file()
    assert AutoProcessor.from_pretrained(str(out)).tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not (out / "adapter_config.json").exists()
    # the reference: the adapter applied by PEFT on a fresh base, on a real record of the test set
    base, family = load_base_model(tiny_mllama)
    reference = PeftModel.from_pretrained(base, adapter)
    merged = AutoModelForImageTextToText.from_pretrained(str(out))
    item = parity_sample(processor, family, data)
    expected = _logits(reference, processor, family, item)
    got = _logits(merged, processor, family, item)
    assert (got - expected).abs().max() <= 1e-4 + 1e-4 * expected.abs().max()  # fp32 rule of TOLERANCES
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_bf16_merge_on_cpu_and_mismatch_guard(tiny_mllama, adapter, tmp_path, capsys):
    out = tmp_path / "merged-bf16"
    argv = ["merge", "--model_name", str(tiny_mllama), "--adapter", adapter, "--output", str(out)]
    assert main([*argv, "--dtype", "bf16"]) == 0
    assert "parity: max |merged - adapter|" in capsys.readouterr().out
    merged = AutoModelForImageTextToText.from_pretrained(str(out))
    assert merged.dtype == torch.bfloat16
    # a tolerance no bf16 merge can meet: refused, and nothing is written
    with pytest.raises(MergeMismatch):
        merge_adapter(str(tiny_mllama), adapter, str(tmp_path / "refused"), dtype="bf16", tolerance=1e-9)
    assert not (tmp_path / "refused").exists()
    assert main([*argv[:-1], str(tmp_path / "refused"), "--dtype", "bf16", "--tolerance", "1e-9"]) == 1


def corrupt_one_merged_linear(monkeypatch, fraction: float) -> None:
    """Makes every merge after this leave ``fraction`` of the first LoRA module's update out of its
    merged weight: one linear slightly wrong, the kind of error a merge bug makes (a lost scale)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    merge = BaseTuner.merge_and_unload

    def corrupted(self, *args, **kwargs):
        name, layer = next((n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer))
        delta = layer.get_delta_weight(layer.active_adapters[0])
        merged = merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.get_submodule(name).weight -= fraction * delta
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupted)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mismatch_guard_catches_a_slightly_corrupted_merge_at_the_default_tolerance(
    tiny_mllama, adapter, tmp_path, monkeypatch, dtype
):
    good = merge_adapter(str(tiny_mllama), adapter, str(tmp_path / "good"), dtype=dtype, log=lambda s: None)
    atol, rtol = TOLERANCES[DTYPES[dtype]]
    assert atol <= good.tolerance and good.max_abs_diff <= good.tolerance  # the dtype's own rule, not 1e-9
    corrupt_one_merged_linear(monkeypatch, fraction=0.05)
    with pytest.raises(MergeMismatch) as caught:
        merge_adapter(str(tiny_mllama), adapter, str(tmp_path / "bad"), dtype=dtype, log=lambda s: None)
    diff, limit = map(float, re.search(r"by (\S+) > tolerance (\S+) ", str(caught.value)).groups())
    assert limit == pytest.approx(good.tolerance, rel=1e-2)  # the same default tolerance as the good merge
    assert diff < good.adapter_effect / 4  # a small error next to what the adapter does: still caught
    assert not (tmp_path / "bad").exists()
