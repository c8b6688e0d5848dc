"""Several processes (FSDP2, gloo, CPU) against one process, and exact resume after a crash.

Every run is a real ``cotune train`` on the tiny Mllama. The reference two-process run goes through
the user's command (``cotune train --enable_fsdp --nproc_per_node 2``, which runs torchrun); the
other multi-process runs start their ranks from a forkserver with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, ...), which runs the same code without paying the imports of torch
and transformers in every process. Single-process references run in this process. Every process
uses one thread, so that the same work gives bit-identical sums.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cotune.config import load_config
from cotune.train.loop import finetune
from cotune.train.metrics import read_metrics
from cotune.train.resume import list_checkpoints

STEPS = 5
COMPARED = ("step", "epoch", "loss", "lr", "grad_norm", "eval_loss")


def _flags(model: Path, train: str, test: str, out: Path, batch: int, **extra) -> list[str]:
    flags = {
        "model_name": model,
        "dataset": train,
        "test_file": test,
        "output_dir": out,
        "batch_size_training": batch,
        "max_train_step": STEPS,
        "data.max_seq_len": 256,
        "lora_config.lora_dropout": 0.0,
        "lr": 1e-3,
        "gradient_clipping": True,
        "run_validation": True,
        "eval_every_steps": 2,
        "max_eval_step": 1,
        "save_every_steps": 2,
        "keep_last_checkpoints": 3,
        "progress": False,
        **extra,
    }
    return [f"--{k}={v}" for k, v in flags.items()]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("COTUNE_FAULT", None)
    return {**env, **extra}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _rank_main(rank: int, world: int, port: int, flags: list[str], env: dict, log_dir: str) -> None:
    """One rank, as torchrun would start it (the env:// variables), running ``cotune train FLAGS``."""
    os.environ.update(env)
    if world > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    torch.set_num_threads(1)
    pairs = [tuple(f[2:].split("=", 1)) for f in flags]
    with open(Path(log_dir) / f"rank{rank}.log", "a") as log:
        finetune(load_config(None, pairs), log=lambda msg, **k: print(msg, file=log, flush=True))


_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "transformers", "peft", "cotune.train.loop"])


def _start_ranks(flags: list[str], log_dir: Path, world: int = 2, **env) -> list:
    """Starts ``world`` ranks of ``cotune train FLAGS``; rank r logs to ``log_dir/rank{r}.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    procs = [
        _CTX.Process(target=_rank_main, args=(r, world, port, flags, env, str(log_dir))) for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _join_ranks(procs: list, timeout: float = 240) -> list[int]:
    """Exit codes of the ranks; a rank still running after ``timeout`` s (a collective hang) fails the test."""
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail(f"ranks did not finish in {timeout} s (a collective hang?)")
    return [p.exitcode for p in procs]


def _run(cmd: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"{' '.join(cmd[:8])} ... did not finish in {timeout} s (a collective hang?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _in_process(flags: list[str], log=print):
    """``cotune train FLAGS`` in this process, one thread (like the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = [tuple(f[2:].split("=", 1)) for f in flags]
        return finetune(load_config(None, pairs), log=log)
    finally:
        torch.set_num_threads(threads)


def _adapter(run_dir: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "adapter_model.safetensors"))


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in read_metrics(run_dir / "metrics.jsonl")]


def _assert_same_metrics(a: list[dict], b: list[dict], rel: float) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rel), (x, y)


def _assert_same_adapter(a: dict, b: dict, atol: float) -> float:
    assert sorted(a) == sorted(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= atol, f"adapters differ by {diff:.3g} > {atol}"
    return diff


@pytest.fixture(scope="module")
def reference_runs(tiny_mllama, shapes, tmp_path_factory):
    """The same 5 steps with 2 processes x batch 1 (FSDP, through the launcher) and 1 process x batch 2."""
    root = tmp_path_factory.mktemp("dist")
    two, one = root / "two", root / "one"
    cmd = [sys.executable, "-m", "cotune", "train", "--enable_fsdp", "--nproc_per_node=2"]
    done = _run(cmd + _flags(tiny_mllama, shapes["train"], shapes["test"], two, 1), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "fsdp: full_shard over 2 process(es)" in done.stdout
    _in_process(_flags(tiny_mllama, shapes["train"], shapes["test"], one, 2))
    return {"two": two, "one": one, "root": root}


def test_two_processes_match_one_process_with_twice_the_batch(reference_runs, tiny_mllama):
    two, one = reference_runs["two"], reference_runs["one"]
    m2, m1 = _metrics(two), _metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1]
    losses = [(a["loss"], b["loss"]) for a, b in zip(m2, m1) if "loss" in a]
    evals = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(m2, m1) if "eval_loss" in a]
    assert len(losses) == STEPS and len(evals) == 4  # steps 0, 2, 4 and the end
    rel = [abs(a - b) / abs(b) for a, b in losses + evals]
    print(f"\nper-step loss relative differences (2x1 vs 1x2): {[f'{r:.1e}' for r in rel]}")
    assert max(rel) <= 1e-4
    grads = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(m2, m1) if "grad_norm" in a]
    assert all(abs(a - b) <= 1e-4 * b for a, b in grads)  # clipping sees the global norm
    diff = _assert_same_adapter(_adapter(two), _adapter(one), atol=1e-5)
    print(f"final adapter max |difference|: {diff:.2e}")

    # the gathered adapter has PEFT's own keys (those of the unsharded run) and loads without cotune
    from peft import PeftModel

    from cotune.models.load import load_base_model

    model = PeftModel.from_pretrained(load_base_model(tiny_mllama)[0], str(two / "adapter"))
    saved = _adapter(two)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, value in saved.items():
        live = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[live], value, rtol=0, atol=0)
    assert (two / "best_adapter" / "adapter_model.safetensors").is_file()


def test_low_cpu_fsdp_other_ranks_start_on_meta_and_match(reference_runs, tiny_mllama, shapes, tmp_path):
    """Only rank 0 reads the checkpoint; the run equals the one-process reference all the same."""
    out = tmp_path / "low_cpu"
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], out, 1, low_cpu_fsdp=True)
    ranks = _start_ranks(flags, tmp_path / "logs")
    assert _join_ranks(ranks, timeout=180) == [0, 0]
    assert "base weights read by process 0 only" in (tmp_path / "logs" / "rank0.log").read_text()
    one = reference_runs["one"]
    _assert_same_metrics(_metrics(out), _metrics(one), rel=1e-4)
    _assert_same_adapter(_adapter(out), _adapter(one), atol=1e-5)


def test_cpu_offload_matches_and_low_cpu_fsdp_steps_aside_for_it(
    reference_runs, tiny_mllama, shapes, tmp_path
):
    out = tmp_path / "offload"
    extra = {"low_cpu_fsdp": True, "fsdp_config.cpu_offload": True}
    ranks = _start_ranks(
        _flags(tiny_mllama, shapes["train"], shapes["test"], out, 1, **extra), tmp_path / "logs"
    )
    assert _join_ranks(ranks, timeout=180) == [0, 0]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "low_cpu_fsdp is not combined with fsdp_config.cpu_offload" in log
    assert "cpu offload on; base weights read by every process" in log
    one = reference_runs["one"]
    _assert_same_metrics(_metrics(out), _metrics(one), rel=1e-4)
    _assert_same_adapter(_adapter(out), _adapter(one), atol=1e-5)


def test_sigkill_then_resume_auto_gives_the_uninterrupted_run(reference_runs, tiny_mllama, shapes):
    out = reference_runs["root"] / "killed"
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], out, 1)
    logs = reference_runs["root"] / "killed-logs"
    ranks = _start_ranks(flags, logs)
    metrics, deadline, killed_at = out / "metrics.jsonl", time.time() + 240, None
    while time.time() < deadline and all(p.is_alive() for p in ranks):
        steps = [r["step"] for r in read_metrics(metrics) if "loss" in r] if metrics.is_file() else []
        if steps and steps[-1] >= 3:
            killed_at = steps[-1]
            for p in ranks:
                p.kill()  # SIGKILL, mid-training
            break
        time.sleep(0.05)
    assert killed_at is not None, f"the run ended or stalled before step 3: {_join_ranks(ranks, 1)}"
    assert _join_ranks(ranks, 30) == [-signal.SIGKILL] * 2
    survivors = [int(p.name.split("_")[1]) for p in list_checkpoints(out)]
    assert survivors and max(survivors) < STEPS

    (logs / "rank0.log").write_text("")
    assert _join_ranks(_start_ranks(flags + ["--resume=auto"], logs)) == [0, 0]
    last = max(survivors)
    assert f"step_{last:08d}: step {last}, epoch 0" in (logs / "rank0.log").read_text()
    reference = reference_runs["two"]
    _assert_same_metrics(_metrics(out), _metrics(reference), rel=1e-9)
    diff = _assert_same_adapter(_adapter(out), _adapter(reference), atol=1e-6)
    _assert_same_adapter(_adapter(out, "best_adapter"), _adapter(reference, "best_adapter"), atol=1e-6)
    print(
        f"\nkilled after step {killed_at}, resumed from step {max(survivors)}: adapter max |diff| {diff:.1e}"
    )


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(reference_runs, tiny_mllama, shapes):
    out = reference_runs["root"] / "crash-in-save"
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], out, 2)
    logs = reference_runs["root"] / "crash-logs"
    crashed = _join_ranks(_start_ranks(flags, logs, world=1, COTUNE_FAULT="checkpoint-write:4"))
    assert crashed == [-signal.SIGKILL]
    partial = out / "checkpoints" / ".step_00000004.tmp-write"
    assert (partial / ".metadata").is_file()  # the weights were written, the checkpoint was not published
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]

    lines: list[str] = []
    _in_process(flags + ["--resume=auto"], log=lines.append)
    assert any("resuming from" in s and "step_00000002" in s for s in lines), lines
    assert not partial.exists()
    reference = reference_runs["one"]
    _assert_same_metrics(_metrics(out), _metrics(reference), rel=1e-9)
    _assert_same_adapter(_adapter(out), _adapter(reference), atol=1e-6)


def test_checkpoint_of_two_processes_resumes_in_one(reference_runs, tiny_mllama, shapes):
    """DCP reshards: LoRA weights and Adam state written by 2 FSDP ranks load in a plain process."""
    out = reference_runs["root"] / "two-to-one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        reference_runs["two"] / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004"
    )
    shutil.copy(reference_runs["two"] / "metrics.jsonl", out / "metrics.jsonl")
    _in_process(_flags(tiny_mllama, shapes["train"], shapes["test"], out, 2) + ["--resume=auto"])
    reference = reference_runs["two"]
    last, ref_last = _metrics(out)[-2:], _metrics(reference)[-2:]
    _assert_same_metrics(last, ref_last, rel=1e-4)
    _assert_same_adapter(_adapter(out), _adapter(reference), atol=1e-5)


# Mllama: hybrid sharding over a (2 replicas, 1 shard) mesh, the replicas all-reduce every unit's gradients;
# LLaVA: full sharding, every unit all-gathers its parameters in forward and backward
@pytest.mark.parametrize(
    "family, strategy",
    [("mllama", ["hybrid_shard", "--fsdp_config.replicate_degree=2"]), ("llava", ["full_shard"])],
)
def test_text_only_batch_on_one_rank_and_image_on_the_other(family, strategy, request, shapes, tmp_path):
    """Every step one rank has only the text-only sample, the other the image one; nothing hangs."""
    tiny_model = request.getfixturevalue(f"tiny_{family}")
    lines = Path(shapes["train"]).read_text().splitlines()
    text_only = {
        "id": "text-only",
        "conversations": [
            {"from": "human", "value": "Which stages does an answer have?"},
            {"from": "gpt", "value": "<SUMMARY> I list them. </SUMMARY>\n\n<CONCLUSION> four </CONCLUSION>"},
        ],
    }
    data = Path(shapes["train"]).parent
    (tmp_path / "train.jsonl").write_text(lines[0] + "\n" + json.dumps(text_only) + "\n")
    (tmp_path / "test.jsonl").write_text(lines[1] + "\n")
    (tmp_path / "images").symlink_to(data / "images")

    def flags(out: Path, batch: int, **extra) -> list[str]:
        return _flags(
            tiny_model,
            str(tmp_path / "train.jsonl"),
            str(tmp_path / "test.jsonl"),
            out,
            batch,
            max_train_step=2,
            num_epochs=2,
            run_validation=False,
            **extra,
        )

    two = flags(tmp_path / "two", 1, **{"fsdp_config.sharding_strategy": strategy[0]})
    ranks = _start_ranks(two + strategy[1:], tmp_path / "logs")
    assert _join_ranks(ranks, timeout=180) == [0, 0]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"fsdp: {strategy[0]} over 2 process(es)" in log and "would hang" not in log
    _in_process(flags(tmp_path / "one", 2))
    m2, m1 = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert len(m2) == len(m1) == 2
    for a, b in zip(m2, m1):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"]


def test_resume_from_a_path_that_is_not_a_checkpoint_stops_before_loading(tiny_mllama, shapes, tmp_path):
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], tmp_path / "run", 2)
    with pytest.raises(FileNotFoundError, match="not a complete cotune checkpoint"):
        _in_process(flags + [f"--resume={tmp_path / 'run' / 'checkpoints' / 'step_00000009'}"])


def test_a_rank_whose_batch_failed_to_load_runs_a_stand_in(tiny_mllama, shapes, tmp_path):
    """With `data.image_check: header` a cut-short image passes the check and fails in training: that
    rank's batch is empty, and it runs a no-label stand-in instead of leaving the others waiting."""
    good = json.loads(Path(shapes["train"]).read_text().splitlines()[0])
    image = Path(shapes["train"]).parent / good["image"]
    data = image.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "good.png").write_bytes(data)
    cut = {**good, "id": "cut", "image": "cut.png"}
    good = {**good, "image": "good.png"}
    (tmp_path / "both.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(cut) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n")

    def flags(out: Path, train: str) -> list[str]:
        both = str(tmp_path / "both.jsonl")
        return _flags(tiny_mllama, train, both, out, 1, max_train_step=2, num_epochs=2, eval_every_steps=1)

    two = flags(tmp_path / "two", str(tmp_path / "both.jsonl")) + ["--data.image_check=header"]
    ranks = _start_ranks(two, tmp_path / "logs")
    assert _join_ranks(ranks, timeout=180) == [0, 0]
    logs = "".join((tmp_path / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    assert "warning: skipped" in logs and "cut.png" in logs
    # the reference: one process training on the good record alone, validating on both (the cut one skipped)
    _in_process(flags(tmp_path / "one", str(tmp_path / "good.jsonl")) + ["--data.image_check=header"])
    m2, m1 = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [m["step"] for m in m2] == [m["step"] for m in m1] and len(m2) >= 4
    for a, b in zip(m2, m1):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-4 * b[key], (key, a, b)


def test_full_fine_tune_under_fsdp_resumes_exactly(tiny_mllama, shapes, tmp_path):
    """`--use_peft False` with 2 FSDP ranks: stopped after a checkpoint and resumed, it ends where the
    uninterrupted run ends (losses and every weight of the saved Hugging Face checkpoint)."""
    from safetensors.torch import load_file as load_weights

    def run(out: Path, steps: int, *more: str) -> None:
        flags = _flags(
            tiny_mllama, shapes["train"], shapes["test"], out, 1, max_train_step=steps, use_peft=False
        )
        assert _join_ranks(_start_ranks([*flags, *more], out / "logs")) == [0, 0]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight, 4)
    run(stopped, 2)
    run(stopped, 4, "--resume=auto")
    assert "resuming from" in (stopped / "logs" / "rank0.log").read_text()
    _assert_same_metrics(_metrics(stopped), _metrics(straight), rel=1e-6)
    a, b = (
        load_weights(str(straight / "model" / "model.safetensors")),
        load_weights(str(stopped / "model" / "model.safetensors")),
    )
    assert sorted(a) == sorted(b) and any("vision_model" in k for k in a)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_two_torchrun_agents_hybrid_sharding_match_one_process(reference_runs, tiny_mllama, shapes, tmp_path):
    """A two-node launch on one machine: two torchrun agents (--nnodes 2, one process each) meet at a
    c10d rendezvous on 127.0.0.1; hybrid sharding replicates across the two "nodes" (a 2 x 1 mesh).
    The run equals one process with the same global batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two-nodes"
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], out, 1)
    flags += ["--enable_fsdp", "--fsdp_config.sharding_strategy=HYBRID_SHARD"]  # the cookbook's spelling
    launch = (
        "-m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_id=cotune-test"
    )
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]  # files: a full pipe would stall an agent
    agents = [
        subprocess.Popen(
            [sys.executable, *launch.split(), f"--node_rank={node}", f"--rdzv_endpoint=127.0.0.1:{port}"]
            + ["-m", "cotune", "train", *flags],
            env=_env(),
            stdout=logs[node].open("w"),
            stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    try:
        for agent in agents:
            agent.wait(timeout=300)
    except subprocess.TimeoutExpired:
        for agent in agents:
            _kill_tree(agent)
        pytest.fail("the two torchrun agents did not finish in 300 s (a rendezvous or collective hang?)")
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert "fsdp: hybrid_shard over 2 process(es) on 2 node(s)" in logs[0].read_text()
    one = reference_runs["one"]
    _assert_same_metrics(_metrics(out), _metrics(one), rel=1e-4)
    _assert_same_adapter(_adapter(out), _adapter(one), atol=1e-5)


def test_a_gpu_process_group_has_a_cpu_backend_for_offloaded_tensors():
    """fsdp_config.cpu_offload keeps shards and gradients in host memory; clipping and the adapter
    gather run collectives on them, which NCCL alone cannot (the CPU path is the offload test above)."""
    from cotune.train.distributed import process_group_backend

    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
