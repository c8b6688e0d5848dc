"""The prepared-data cache (``cotune.data.cache``): the same batches, problems and adapter as reading
the data in memory; shares of several processes merge into the one-process entry; a changed file
or setting builds a new entry, a killed build leaves none."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from cotune.config import load_config
from cotune.data import cache, prepared, shard_pool
from cotune.data.build import build_data, encode_splits, loader_settings
from cotune.data.chat import SystemPromptRefused
from cotune.data.check import check_data
from cotune.data.records import problem_order
from cotune.models.families import MLLAMA
from cotune.train.loop import finetune


def options(data, cache_dir, *extra):
    return [("dataset", str(data)), ("data.cache_dir", str(cache_dir)), *extra]


@pytest.fixture(scope="module")
def messy(shapes, tmp_path_factory):
    """The shapes training records plus bad ones: a broken line, a missing image, a file that is not
    an image, a reply too long for max_seq_len=300, a record with no reply."""
    folder = tmp_path_factory.mktemp("messy")
    shutil.copytree(shapes["images"], folder / shapes["images"].name)
    (folder / "not_an_image.png").write_text("hello")
    lines = shapes["train"].read_text().splitlines()
    good = json.loads(lines[0])
    long = dict(
        good, id="long", conversations=[good["conversations"][0], {"from": "gpt", "value": "word " * 400}]
    )
    bad = [
        "{not json",
        json.dumps(dict(good, id="missing", image="nowhere.png")),
        json.dumps(dict(good, id="notimage", image="not_an_image.png")),
        json.dumps(long),
        json.dumps(dict(good, id="noreply", conversations=good["conversations"][:1])),
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines[:6] + bad + lines[6:]) + "\n")
    return path


def batches(loader):
    return [{k: v for k, v in b.items()} for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k


def test_cached_batches_equal_in_memory_and_a_changed_file_or_setting_rebuilds(processor, messy, tmp_path):
    extra = [("data.max_seq_len", "300"), ("data.val_max_samples", "1"), ("batching_strategy", "packing")]
    extra += [("context_length", "600"), ("data.image_check", "header")]
    said = []
    cached = build_data(
        load_config(None, options(messy, tmp_path / "c", *extra)), processor, MLLAMA, log=said.append
    )
    plain = build_data(
        load_config(None, options(messy, tmp_path / "c", ("data.cache", "False"), *extra)),
        processor,
        MLLAMA,
        log=said.append,
    )
    assert cached.report == plain.report
    assert any("seeded subset of 1 of the 2" in line for line in cached.report)
    assert_same_batches(batches(cached.train), batches(plain.train))
    assert_same_batches(batches(cached.val), batches(plain.val))
    assert len(list((tmp_path / "c").iterdir())) == 1 and any("prepared in" in s for s in said)

    said.clear()
    build_data(load_config(None, options(messy, tmp_path / "c", *extra)), processor, MLLAMA, log=said.append)
    assert any("read from the cache" in s for s in said) and not any("prepared in" in s for s in said)
    os.utime(messy, ns=(os.stat(messy).st_atime_ns, os.stat(messy).st_mtime_ns + 10**9))  # the file changed
    build_data(load_config(None, options(messy, tmp_path / "c", *extra)), processor, MLLAMA, log=said.append)
    extra[0] = ("data.max_seq_len", "400")  # a setting that changes the encoding
    build_data(load_config(None, options(messy, tmp_path / "c", *extra)), processor, MLLAMA, log=said.append)
    assert len(list((tmp_path / "c").iterdir())) == 3


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_pictures_stored_in_a_table_are_cached_as_references_to_their_cells(processor, tmp_path, kind):
    from cotune.data.formats import TABLE_MARK
    from test_formats import write_hf

    path, columns = write_hf(tmp_path, kind)
    extra = [("data.columns", json.dumps(columns)), ("data.max_seq_len", "256"), ("run_validation", "False")]
    said = []
    cached = build_data(
        load_config(None, options(path, tmp_path / "c", *extra)), processor, MLLAMA, log=said.append
    )
    plain = build_data(
        load_config(None, options(path, tmp_path / "c", ("data.cache", "False"), *extra)), processor, MLLAMA
    )
    assert any("prepared in" in s for s in said)  # the table's data went through the cache
    assert_same_batches(batches(cached.train), batches(plain.train))  # pixel values included
    (entry,) = (tmp_path / "c").iterdir()
    assert TABLE_MARK in prepared.EncodedFile(entry).column("images")[0]


def test_problems_are_those_of_data_check(processor, messy, tmp_path):
    cfg = load_config(None, options(messy, tmp_path / "c", ("data.max_seq_len", "300")))
    splits = encode_splits(cfg, processor, MLLAMA, 0, 1, log=lambda s: None)
    report = check_data(cfg, messy, processor, MLLAMA, log=lambda s: None)
    assert len(report.problems) == 5
    key = lambda p: problem_order(p.where)  # noqa: E731
    assert [str(p) for p in sorted(splits.problems, key=key)] == [str(p) for p in report.problems]


def test_two_shares_merge_into_the_one_process_entry(processor, messy, tmp_path):
    cfg = load_config(None, options(messy, tmp_path / "c", ("data.max_seq_len", "300")))
    whole = cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "one", log=lambda s: None)
    merged = tmp_path / "two" / "entry"
    for rank in (0, 1):
        cache.write_share(messy, cfg.data, processor, MLLAMA, merged, rank, 2, log=lambda s: None)
    cache.merge_shards(merged, 2, {})
    two = prepared.EncodedFile(merged)
    assert sorted(whole.arrays) == sorted(two.arrays)
    for name, values in whole.arrays.items():
        assert np.array_equal(values, two.arrays[name]), name
    assert whole.problems == two.problems and whole.encode_problems == two.encode_problems
    first, second = [s["records"] for s in two.meta["shares"]]
    assert first > 0 and second > 0 and first + second == len(whole) + 2  # with the 2 of bad images


def test_shares_of_a_json_lines_file_read_each_line_once_numbered_as_in_the_whole(tmp_path):
    import random

    from cotune.data.formats import iter_json_records

    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"k": k, "text": "x" * random.Random(k).randrange(200)}).encode() for k in range(40)]
    lines[5], lines[9], lines[12] = b"", b"{broken", b'{"bad": "\xff"}'
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    whole = [(w, o if isinstance(o, dict) else type(o).__name__) for w, o in iter_json_records(path)]
    assert [w for w, _ in whole][:6] == [f"rows.jsonl:{n}" for n in (1, 2, 3, 4, 5, 7)]  # line 6 is blank
    assert len(whole) == 39 and dict(whole)["rows.jsonl:13"] == "JSONDecodeError"  # not UTF-8: a problem
    size, rng = path.stat().st_size, random.Random(0)
    for parts in (2, 3, 7):
        cuts = [0, *sorted(rng.sample(range(1, size), parts - 1)), size]
        shares = [list(iter_json_records(path, (a, b))) for a, b in zip(cuts, cuts[1:])]
        got = [(w, o if isinstance(o, dict) else type(o).__name__) for share in shares for w, o in share]
        assert got == whole, parts


def test_worker_processes_build_the_entry_one_process_builds_alone(processor, messy, tmp_path):
    cfg = load_config(None, options(messy, tmp_path / "c", ("data.max_seq_len", "300")))
    cfg.data.prepare_workers = 0
    alone = cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "one", log=lambda s: None)
    cfg.data.prepare_workers = 2  # explicit: the pool even for these few records, cut in 8 parts
    pooled = cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "two", log=lambda s: None)
    assert pooled.meta["shares"][0]["workers"] == 2 and alone.meta["shares"][0]["workers"] == 1
    assert sorted(alone.arrays) == sorted(pooled.arrays)
    for name, values in alone.arrays.items():
        assert values.dtype == pooled.arrays[name].dtype and np.array_equal(values, pooled.arrays[name]), name
    assert alone.problems == pooled.problems and len(alone.problems) == 4  # 2 read, 2 images
    assert alone.encode_problems == pooled.encode_problems and list(alone.encode_problems) == [
        6
    ]  # past the first part
    assert [p.name for p in (tmp_path / "two").iterdir()] == [pooled.folder.name]  # parts removed


def test_a_workers_error_stops_the_build_as_it_would_alone(processor, messy, tmp_path):
    cfg = load_config(None, options(messy, tmp_path / "c", ("data.system_prompt", "Be brief.")))
    cfg.data.prepare_workers = 2
    with pytest.raises(SystemPromptRefused, match="data.system_prompt"):
        cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "c", log=lambda s: None)
    assert not any((p / "meta.json").exists() for p in (tmp_path / "c").iterdir())


def test_the_pool_is_used_where_a_process_has_cpus_to_itself(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shard_pool.pool_workers(-1, 100_000) == 4 and shard_pool.pool_workers(-1, 100) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert shard_pool.pool_workers(-1, 100_000) == 0  # one CPU each: encode in the process
    assert shard_pool.pool_workers(3, 10) == 3 and shard_pool.pool_workers(1, 10**6) == 0


def test_a_killed_build_leaves_no_entry_and_pickles_stay_small(processor, messy, tmp_path, monkeypatch):
    cfg = load_config(None, options(messy, tmp_path / "c"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "merge_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "c", log=lambda s: None)
    assert [p.name.split(".")[1][:3] for p in (tmp_path / "c").iterdir()] == ["tmp"]  # no entry
    monkeypatch.undo()
    entry = cache.prepare_file(messy, cfg.data, processor, MLLAMA, tmp_path / "c", log=lambda s: None)
    cache.remove_stale(tmp_path / "c", older_than=0)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry.folder.name]

    rows = prepared.EncodedRows(entry, np.flatnonzero(entry.status <= 1))
    copy = pickle.loads(pickle.dumps(rows))  # a spawned DataLoader worker maps the files again
    assert len(pickle.dumps(rows)) < 2000
    assert np.array_equal(copy[3].input_ids, rows[3].input_ids) and copy[3].images == rows[3].images


def test_the_cache_keeps_within_its_size_removing_the_least_recently_used(processor, messy, tmp_path):
    import time

    root, said = tmp_path / "c", []
    cfg = load_config(None, options(messy, root, ("data.max_seq_len", "300")))
    first = cache.prepare_file(messy, cfg.data, processor, MLLAMA, root, log=said.append).folder
    size = sum(f.stat().st_size for f in first.iterdir())
    old = time.time() - 7200  # two hours ago: not in use
    os.utime(first / "meta.json", (old, old))
    for n, seq in enumerate(("301", "302")):  # two more entries of the same size, used in turn
        cfg = load_config(None, options(messy, root, ("data.max_seq_len", seq)))
        cfg.data.cache_max_gib = 0  # no limit while building them
        entry = cache.prepare_file(messy, cfg.data, processor, MLLAMA, root, log=said.append).folder
        os.utime(entry / "meta.json", (old + 60 * (n + 1), old + 60 * (n + 1)))
    cfg = load_config(None, options(messy, root, ("data.max_seq_len", "300")))
    cache.prepare_file(messy, cfg.data, processor, MLLAMA, root, log=said.append)  # the first is used again
    assert (first / "meta.json").stat().st_mtime > time.time() - 60
    cfg = load_config(None, options(messy, root, ("data.max_seq_len", "303")))
    cfg.data.cache_max_gib = 2.5 * size / 2**30  # room for two of the four
    newest = cache.prepare_file(messy, cfg.data, processor, MLLAMA, root, log=said.append).folder
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([first.name, newest.name])  # the two used longest ago are gone
    assert any("removed 2 least recently used entries" in s for s in said)
    assert cache.evict(root, 1, keep=newest) == []  # the other was used this hour: kept over the limit


def test_loader_defaults_use_workers_and_pinned_memory_on_a_gpu_only(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_settings(-1, "cuda") == (7, True)
    assert loader_settings(-1, "cpu") == (0, False)
    assert loader_settings(3, "cpu") == (3, False)


@pytest.mark.slow
def test_training_from_the_cache_gives_the_same_losses_and_adapter(tiny_mllama, shapes, tmp_path):
    def run(name, use_cache):
        cfg = load_config(
            None,
            [("model_name", str(tiny_mllama)), ("dataset", str(shapes["train"])), ("output_dir", str(tmp_path / name)),
             ("data.cache", str(use_cache)), ("data.cache_dir", str(tmp_path / "c")), ("batch_size_training", "2"),
             ("max_train_step", "2"), ("num_epochs", "1"), ("lr", "1e-2"), ("keep_last_checkpoints", "0"),
             ("data.val_max_samples", "1"),
             ("progress", "False"), ("data.max_seq_len", "512")],
        )  # fmt: skip
        finetune(cfg, log=lambda s: None)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        from safetensors.torch import load_file

        adapter = next((tmp_path / name).rglob("adapter_model.safetensors"))
        return [r.get("loss", r.get("eval_loss")) for r in rows], load_file(adapter)

    losses, adapter = run("cached", True)
    plain_losses, plain_adapter = run("plain", False)
    assert losses == plain_losses and len(losses) >= 4  # the step-0 validation, 2 steps, the last one
    assert adapter.keys() == plain_adapter.keys()
    assert all(torch.equal(adapter[k], plain_adapter[k]) for k in adapter)


def test_the_scale_bench_writes_distinct_photos_and_four_stage_replies(tmp_path):
    import sys
    from pathlib import Path

    from PIL import Image

    from cotune.data.check import stage_problem
    from cotune.data.records import load_samples

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import data_scale
    finally:
        sys.path.pop(0)
    train, test = data_scale.write_dataset(tmp_path, 4)
    samples, problems = load_samples(train)
    assert not problems and len(samples) == 3 and len(load_samples(test)[0]) == 1
    pictures = [Image.open(s.images[0]) for s in samples]
    assert all(p.size == (640, 480) and p.format == "JPEG" for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 3
    assert all(stage_problem(s.messages[-1]["content"][0]["text"]) is None for s in samples)
