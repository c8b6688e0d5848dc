"""cotune studio without a browser: what it reads, what it writes, and what it refuses.

``write_studio_files`` builds what a user has after a run (data with a broken record, ``data reason``
output, a run folder with curves, config, adapter and eval output); ``test_studio_browser.py`` drives
the page over the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cotune.config import ConfigError, load_options, save_config
from cotune.studio.review import ReviewQueue
from cotune.studio.safety import Folders, Refused

pytest.importorskip("fastapi")


def _metrics(path: Path, scale: float, accuracy: bool) -> None:
    rows = []
    for step in range(0, 9):
        if step:
            rows.append({"step": step, "epoch": 0, "loss": scale * 10 / (1 + step), "lr": 1e-3})
        if step % 4 == 0:
            row = {"step": step, "epoch": 0, "eval_loss": scale * 9 / (1 + step)}
            row.update(
                {
                    f"eval_loss_{s}": scale * k / (1 + step)
                    for k, s in enumerate(("summary", "caption", "reasoning", "conclusion"), 5)
                }
            )
            if accuracy:
                row["eval_accuracy"] = step / 10
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_studio_files(root: Path, tiny_mllama: Path, shapes: dict, adapter: bool = True) -> dict:
    """Data (the shapes test set, a record whose picture is missing, one without stages), ``data reason``
    output, and two runs (``run``: adapter, config, curves with task metrics, eval output; ``other``:
    curves only)."""
    data = root / "data"
    shutil.copytree(Path(shapes["test"]).parent / "images", data / "images")
    records = [json.loads(line) for line in Path(shapes["test"]).read_text().splitlines()]
    broken = dict(records[0], id="broken-picture", image="images/missing.png")
    no_stages = dict(records[1], id="no-stages")
    no_stages["conversations"] = [records[1]["conversations"][0], {"from": "gpt", "value": "just an answer"}]
    lines = records + [broken, no_stages]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    reply = records[0]["conversations"][1]["value"]
    question = records[0]["conversations"][0]["value"].replace("<image>\n", "")
    attempts = [
        {"id": "r1", "attempt": 0, "image": records[0]["image"], "question": question, "answer": "square",
         "reply": reply, "accepted": True, "why": "", "teacher": "t", "hinted": False},
        {"id": "r1", "attempt": 1, "image": records[0]["image"], "question": question, "answer": "square",
         "reply": "<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>r</REASONING><CONCLUSION>circle</CONCLUSION>",
         "accepted": False, "why": "wrong answer", "teacher": "t", "hinted": False},
        {"id": "r2", "attempt": 0, "image": records[1]["image"], "question": "How many?", "answer": "4",
         "reply": "<CONCLUSION>3</CONCLUSION>", "accepted": False, "why": "wrong answer", "teacher": "t", "hinted": True},
    ]  # fmt: skip
    (data / "reasoned.attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in attempts))
    (data / "reasoned.jsonl").write_text(json.dumps(records[0]) + "\n")

    run, other = root / "runs" / "run", root / "runs" / "other"
    run.mkdir(parents=True)
    other.mkdir(parents=True)
    _metrics(run / "metrics.jsonl", 1.0, accuracy=True)
    _metrics(other / "metrics.jsonl", 1.5, accuracy=False)
    cfg = load_options(
        "train", overrides=[("model_name", str(tiny_mllama)), ("output_dir", str(run))]
    ).options
    save_config(cfg, run / "config.yaml")
    if adapter:
        from helpers import make_adapter

        make_adapter(tiny_mllama, run / "adapter", seed=3)
    golds = [r.get("answer") or "x" for r in records]
    predictions = {}
    for model, right in (("none", 1), ("run", 2)):
        predictions[model] = [
            {"id": r["id"], "gold": g, "reply": f"<CONCLUSION>{g if k < right else 'nothing'}</CONCLUSION>",
             "score": {"kind": "text", "correct": k < right, "exact": k < right},
             "reply_shuffled_images": f"<CONCLUSION>{g if k == 0 else 'other'}</CONCLUSION>"}
            for k, (r, g) in enumerate(zip(records, golds))
        ]  # fmt: skip
    # cotune eval's files, written here in its format (its writer's tables need a real evaluation)
    (run / "eval").mkdir()
    lines = [json.dumps({"model": m, **row}) + "\n" for m, rows in predictions.items() for row in rows]
    (run / "eval" / "predictions.jsonl").write_text("".join(lines))
    (run / "eval" / "eval.json").write_text(json.dumps({"data": str(data / "test.jsonl"), "models": {}}))
    table = "| metric | none | run |\n|---|---:|---:|\n| answer accuracy | 12.5% | 25.0% |\n"
    (run / "eval" / "eval.md").write_text("# cotune eval\n\n## per class\n\n" + table)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(run / "eval" / "confusion_run_text.png")
    return {"data": data / "test.jsonl", "reasoned": data / "reasoned.jsonl", "run": run, "other": other,
            "records": records}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mllama, shapes):
    return write_studio_files(tmp_path_factory.mktemp("studio"), tiny_mllama, shapes, adapter=False)


def _studio_options(files, extra=()):
    return load_options(
        "studio",
        overrides=[("studio.data", str(files["data"])), ("studio.data", str(files["reasoned"])),
                   ("studio.run", str(files["run"])), ("studio.run", str(files["other"])), *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(files):
    from fastapi.testclient import TestClient

    from cotune.studio.app import build_app
    from cotune.studio.command import build_studio

    parsed = _studio_options(files)
    return TestClient(build_app(build_studio(parsed.options, parsed.given, log=lambda s: None)))


def test_records_carry_the_problems_data_check_finds(client, files):
    from cotune.data.check import check_data

    body = client.get("/api/data/0", params={"limit": 500}).json()
    by_id = {r["id"]: r for r in body["records"]}
    assert body["total"] == len(files["records"]) + 2
    report = check_data(load_options("data").options, files["data"], log=lambda s: None)
    assert [p.reason for p in report.problems] == by_id["broken-picture"]["problems"]  # the check's own words
    assert any("four-stage" in w for w in by_id["no-stages"]["warnings"])
    first = by_id[files["records"][0]["id"]]
    assert list(first["turns"][1]["stages"]) == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    assert first["images"][0].startswith("/api/image/")
    picture = client.get(first["images"][0])
    assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
    only = client.get("/api/data/0", params={"problem": "problems"}).json()["records"]
    assert [r["id"] for r in only] == ["broken-picture"]
    square = client.get("/api/data/0", params={"answer": first["answer"]}).json()["records"]
    assert square and all(r["answer"] == first["answer"] for r in square)


def test_augmentation_preview_is_what_training_draws(client, files):
    import io

    import numpy as np
    from PIL import Image

    from cotune.data.augment import Augmenter
    from cotune.data.images import load_image

    got = np.asarray(Image.open(io.BytesIO(client.get("/api/augment/0/0/2").content)))
    cfg = load_options("data", files["run"] / "config.yaml").options
    import dataclasses

    augmenter = Augmenter(dataclasses.replace(cfg.data.augment, enabled=True), cfg.seed)
    original = load_image(files["data"].parent / files["records"][0]["image"])
    want = np.asarray(augmenter(original, 0, epoch=2))
    assert got.shape == want.shape and (got == want).all()
    assert not (got == np.asarray(original)).all()


def test_runs_give_every_numeric_curve_and_the_config(client):
    runs = client.get("/api/runs").json()
    assert [r["name"] for r in runs] == ["run", "other"]
    curves = runs[0]["curves"]
    assert {"loss", "eval_loss", "eval_loss_summary", "eval_accuracy", "lr"} <= set(curves)
    assert curves["eval_accuracy"] == [[0, 0.0], [4, 0.4], [8, 0.8]]
    assert "model_name:" in runs[0]["config"] and runs[0]["evals"] == ["eval"]


def test_answers_join_predictions_with_the_pictures_and_flag_shuffled(client, files):
    body = client.get("/api/answers/0", params={"folder": "eval"}).json()
    assert body["models"] == ["none", "run"]
    rows = body["rows"]
    assert rows[0]["images"] and rows[0]["question"]
    assert [r["by_model"]["run"]["correct"] for r in rows[:3]] == [True, True, False]
    assert [r["by_model"]["none"]["unchanged_when_shuffled"] for r in rows[:2]] == [True, False]
    assert len(body["pictures"]) == 1 and body["pictures"][0].endswith("/eval/confusion_run_text.png")
    assert client.get("/api/answers/0", params={"folder": "../../"}).status_code == 404


@pytest.mark.parametrize(
    "url",
    ["/api/image/0/../../../../etc/passwd", "/api/image/0/..%2F..%2F..%2Fetc%2Fpasswd",
     "/api/image/0/%2Fetc%2Fpasswd", "/api/image/99/x.png", "/static/..%2Fapp.py", "/static/../app.py"],
)  # fmt: skip
def test_no_path_leaves_the_given_folders(client, url):
    response = client.get(url)
    assert response.status_code in (403, 404), response.text
    assert b"root:" not in response.content


def test_folders_refuse_symlinks_out(tmp_path):
    inside = tmp_path / "given"
    inside.mkdir()
    (tmp_path / "secret.txt").write_text("x")
    (inside / "link.png").symlink_to(tmp_path / "secret.txt")
    folders = Folders([inside])
    with pytest.raises(Refused):
        folders.resolve(0, "link.png")
    with pytest.raises(Refused):
        folders.inside(tmp_path / "secret.txt")


def test_an_open_address_needs_a_token_and_every_request_carries_it(files, monkeypatch):
    from fastapi.testclient import TestClient

    from cotune.studio.app import build_app
    from cotune.studio.command import build_studio

    monkeypatch.delenv("COTUNE_STUDIO_TOKEN", raising=False)
    parsed = _studio_options(files, [("studio.host", "0.0.0.0")])
    with pytest.raises(ConfigError, match="token"):
        build_studio(parsed.options, parsed.given, log=lambda s: None)
    parsed = _studio_options(files, [("studio.host", "0.0.0.0"), ("studio.token", "s3cret")])
    client = TestClient(build_app(build_studio(parsed.options, parsed.given, log=lambda s: None)))
    assert client.get("/api/overview").status_code == 401
    assert client.get("/api/overview", headers={"X-Studio-Token": "wrong"}).status_code == 401
    assert client.get("/health").status_code == 200
    first = client.get("/?token=s3cret")
    assert first.status_code == 200 and "studio_token" in first.cookies
    assert client.get("/api/overview").status_code == 200  # the cookie from the first visit


def test_review_decisions_resume_and_make_training_records_and_pairs(files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(files["data"].parent, data)
    queue = ReviewQueue(data / "reasoned.jsonl", Folders([data]))
    assert queue.attempts and [i["key"] for i in queue.items] == ["r1#0", "r1#1", "r2#0"]
    queue.decide("r1#0", "accept")
    queue.decide("r1#1", "reject")
    queue.decide("r2#0", "edit", "<CONCLUSION>4</CONCLUSION>")
    again = ReviewQueue(data / "reasoned.jsonl", Folders([data]))  # a restart reads the decisions back
    assert again.counts()["counts"] == {"accept": 1, "reject": 1, "edit": 1}
    reviewed = [json.loads(line) for line in (data / "reasoned.reviewed.jsonl").read_text().splitlines()]
    assert [r["id"] for r in reviewed] == ["r1", "r2"]
    assert reviewed[1]["conversations"][1]["value"] == "<CONCLUSION>4</CONCLUSION>"
    pairs = [json.loads(line) for line in (data / "reasoned.pairs.jsonl").read_text().splitlines()]
    first = queue.items[0]
    assert pairs[0] == {"id": "r1", "image": first["image"], "conversations": [{"from": "human", "value": first["question"]}],
                        "chosen": first["reply"], "rejected": queue.items[1]["reply"]}  # fmt: skip
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (
        "<CONCLUSION>4</CONCLUSION>",
        "<CONCLUSION>3</CONCLUSION>",
    )
    assert sorted(p.name for p in data.iterdir() if p.name.startswith("reasoned.")) == [
        "reasoned.attempts.jsonl", "reasoned.jsonl", "reasoned.pairs.jsonl", "reasoned.review.json", "reasoned.reviewed.jsonl"
    ]  # fmt: skip
    with pytest.raises(Refused):
        ReviewQueue(data / "reasoned.jsonl", Folders([tmp_path / "elsewhere"]))


def test_cli_takes_data_and_refuses_a_missing_file(tmp_path):
    from cotune.cli import main

    assert main(["studio", "--data", str(tmp_path / "nope.jsonl")]) == 2


def test_decisions_and_uploads_over_http(client, files):
    import base64

    state = client.get("/api/review/1").json()
    assert state["attempts"] and state["items"][0]["image_url"].startswith("/api/image/")
    made = client.post("/api/review/1", json={"key": "r2#0", "decision": "reject"})
    assert made.status_code == 200 and made.json()["counts"]["reject"] == 1
    assert client.post("/api/review/1", json={"key": "r2#0", "decision": "maybe"}).status_code == 400
    assert client.post("/api/review/1", json={"key": "r2#0", "decision": "undo"}).json()["decided"] == 0
    png = (files["data"].parent / files["records"][0]["image"]).read_bytes()
    up = client.post(
        "/api/chat/upload", json={"data": "data:image/png;base64," + base64.b64encode(png).decode()}
    )
    assert up.status_code == 200 and up.json()["width"] > 0
    bad = client.post("/api/chat/upload", json={"data": base64.b64encode(b"not a picture").decode()})
    assert bad.status_code == 422 and "cannot be decoded" in bad.json()["detail"]


@pytest.mark.slow
def test_chat_through_cotune_serve_answers_as_the_local_model(tmp_path, tiny_mllama, shapes):
    """The chat's two back ends, one picture and question: a running ``cotune serve`` (OpenAI API,
    streamed) and the local model (``cotune generate``'s ``respond``) give the same greedy reply."""
    from cotune.data.images import load_image
    from cotune.serve.launch import serve_subprocess
    from cotune.studio.chat import LocalChat, ServeChat
    from cotune.studio.command import chat_backend
    from helpers import make_adapter

    adapter = make_adapter(tiny_mllama, tmp_path / "run" / "adapter", seed=5)
    picture = load_image(sorted((Path(shapes["test"]).parent / "images").glob("*.png"))[0])
    overrides = [("model_name", str(tiny_mllama)), ("adapter", f"ad={adapter}"), ("max_new_tokens", 12)]
    parsed = load_options("studio", overrides=overrides)
    local = chat_backend(parsed.options, parsed.given, [], log=lambda s: None)
    assert isinstance(local, LocalChat) and local.names() == ["none", "ad"]
    want = "".join(local.answer("What colour is it?", picture, "ad")).strip()
    with serve_subprocess(["--model_name", str(tiny_mllama), "--adapter", f"ad={adapter}"]) as (url, _):
        served = ServeChat(url, cfg=parsed.options)
        assert "ad" in served.names()
        got = "".join(served.answer("What colour is it?", picture, "ad")).strip()
    assert got == want and want


def test_eval_writes_each_answer_with_shuffled_pictures_for_the_answers_page(base, processor, shapes):
    """``predictions.jsonl``'s ``reply_shuffled_images`` (the Answers page's filter) is the reply to the
    same prompt with the shuffled pictures, as ``generate`` gives it."""
    from cotune.data.records import load_samples
    from cotune.eval.ablation import with_shuffled_images
    from cotune.eval.evaluate import evaluate_models, first_turn
    from cotune.infer.generate import generate

    model, family = base
    samples = load_samples(shapes["test"])[0][:2]
    results = evaluate_models(
        model, processor, family, samples, ["none"], batch_size=2, max_new_tokens=4, log=lambda *_: None,
        image_conditions=("true", "shuffled"),
    )  # fmt: skip
    rows = results["predictions"]["none"]
    shuffled = with_shuffled_images(samples, 0)
    want = generate(
        model, processor, family, [(first_turn(s)[0], s.images) for s in shuffled], max_new_tokens=4
    )
    assert [r["reply_shuffled_images"] for r in rows] == want
