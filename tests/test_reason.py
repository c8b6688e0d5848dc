"""`cotune data reason` against a fake OpenAI-compatible teacher (a local HTTP server in this process):
right replies kept, every attempt journaled, retries on 429/5xx, a bad key stops with one clear
error, and a run killed mid-way resumes to exactly the output of an uninterrupted one."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cotune.cli import main
from cotune.data.reason import HINT, Job, judge, prompt_content, read_journal, reason_records
from cotune.data.sample import Sample
from cotune.data.sources import import_source
from cotune.demo.synthetic import COLOURS
from cotune.options.sources import ImportOptions, ReasonOptions
from test_sources import circle

NAMES = sorted(COLOURS)


def fake_reply(colour: str, seed: int) -> str:
    """What the fake teacher says: by (colour, seed), right, wrong or malformed."""
    k = (seed + NAMES.index(colour)) % 3
    said = colour if k == 2 else NAMES[(NAMES.index(colour) + 1) % len(NAMES)]
    text = f"<SUMMARY> Look at the fill. </SUMMARY> <CAPTION> A {said} circle. </CAPTION> <REASONING> The fill is {said}. </REASONING>"
    return text if k == 0 else text + f" <CONCLUSION> {said} </CONCLUSION>"


class FakeTeacher:
    """A chat completions server that reads the picture's centre colour and answers by ``fake_reply``."""

    def __init__(self, delay: float = 0.0, failures: tuple[int, ...] = (), status: int = 200):
        self.delay, self.failures, self.status = delay, list(failures), status
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None):
                body = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed mid-request: what the kill test does

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with teacher.lock:
                    failure = teacher.failures.pop(0) if teacher.failures else None
                if failure:
                    return self._send(failure, {"error": {"message": "busy"}}, {"Retry-After": "0"})
                if teacher.status != 200:
                    return self._send(teacher.status, {"error": {"message": "bad key"}})
                parts = body["messages"][0]["content"]
                url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
                rgb = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                centre = np.asarray(rgb)[rgb.height // 2, rgb.width // 2]
                colour = min(NAMES, key=lambda n: np.abs(np.array(COLOURS[n]) - centre).sum())
                with teacher.lock:
                    teacher.prompts.append(next(p["text"] for p in parts if p["type"] == "text"))
                time.sleep(teacher.delay)
                reply = fake_reply(colour, body["seed"])
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}],
                                 "usage": {"prompt_tokens": 50, "completion_tokens": 20}})  # fmt: skip

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def circles(tmp_path) -> Path:
    """Imported records: two circles of each of the six colours, 'What colour is the circle?'."""
    root = tmp_path / "photos"
    for colour in NAMES:
        (root / colour).mkdir(parents=True)
        for k in range(2):
            circle(colour, k).save(root / colour / f"{k}.png")
    report = import_source(
        root, tmp_path / "data", ImportOptions(question="What colour is the circle?"), log=lambda s: None
    )
    return report.records_file


def test_judge_accepts_only_a_well_formed_reply_with_the_right_conclusion():
    sample = Sample("x", [], meta={"answer": "No"})
    job = Job(sample, 0, "Is there a fracture?", "No", "a.png")
    four = "<SUMMARY> s </SUMMARY> <CAPTION> c </CAPTION> <REASONING> r </REASONING> <CONCLUSION> {} </CONCLUSION>"
    assert judge(four.format("No evidence of a fracture."), job) == ""
    assert judge(four.format("Yes, there is one."), job) == "wrong answer"
    assert judge("<SUMMARY> s </SUMMARY> <CONCLUSION> No </CONCLUSION>", job) == "malformed"
    choice = Job(
        Sample("y", [], meta={"answer": "B", "options": {"A": "red", "B": "blue"}}),
        0,
        "Colour?",
        "B",
        "b.png",
    )
    assert judge(four.format("B"), choice) == "" and judge(four.format("blue"), choice) == ""
    assert judge(four.format("A"), choice) == "wrong answer"


def _opts(url: str, **kw) -> ReasonOptions:
    return ReasonOptions(teacher_url=[url], teacher_model="fake", **{"concurrency": 3, **kw})


def test_right_replies_kept_every_attempt_journaled_and_retried(circles, tmp_path):
    teacher = FakeTeacher(failures=(429, 503, 500))  # the first three requests fail, then succeed on retry
    try:
        out = circles.parent / "train.jsonl"  # beside the imported records: image paths stay as they were
        report = reason_records(
            circles, out, _opts(teacher.url, attempts=3, retries=4), seed=10, log=lambda s: None
        )
    finally:
        teacher.close()
    attempts = read_journal(out.with_name("train.attempts.jsonl"))
    assert (
        len(attempts) == 36 and len({(a["id"], a["attempt"]) for a in attempts}) == 36 and report.failed == 0
    )
    for a in attempts:
        expected = fake_reply(a["answer"], 10 + a["attempt"])
        assert a["reply"] == expected and a["hinted"] is False and a["teacher"].startswith("fake@")
        kind = (10 + a["attempt"] + NAMES.index(a["answer"])) % 3
        assert (a["accepted"], a["why"]) == {
            0: (False, "malformed"),
            1: (False, "wrong answer"),
            2: (True, ""),
        }[kind]
        assert a["image"] == f"images/{a['answer']}/{a['id'][-1]}.png"
    kept = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in kept] == [
        r["id"] for r in map(json.loads, open(circles))
    ]  # one right attempt each
    assert all(
        r["conversations"][1]["value"].endswith(f"<CONCLUSION> {r['answer']} </CONCLUSION>") for r in kept
    )
    assert report.attempts == {"": 12, "wrong answer": 12, "malformed": 12}
    assert report.per_class["red"] == [2, 6, 2, 2] and report.tokens == 36 * 20
    assert not any(HINT.split(":")[0] in p for p in teacher.prompts)
    # the training file trains: its records load with their images (paths relative to it)
    from cotune.data.records import load_samples

    samples, problems = load_samples(out)
    assert problems == [] and len(samples) == 12


def test_hint_and_prompt_file_go_into_the_prompt(circles, tmp_path):
    teacher = FakeTeacher()
    (tmp_path / "prompt.txt").write_text("MY OWN INSTRUCTIONS")
    try:
        opts = _opts(teacher.url, hint_answer=True, prompt_file=str(tmp_path / "prompt.txt"), max_records=2)
        reason_records(circles, tmp_path / "out.jsonl", opts, log=lambda s: None)
    finally:
        teacher.close()
    assert len(teacher.prompts) == 2 and all(p.startswith("MY OWN INSTRUCTIONS") for p in teacher.prompts)
    assert (
        "The correct answer is: blue." in teacher.prompts[0]
        and "Question: What colour is the circle?" in teacher.prompts[0]
    )
    assert all(a["hinted"] for a in read_journal(tmp_path / "out.attempts.jsonl"))
    # a template places the question itself
    job = Job(Sample("x", [], meta={}), 0, "Is it red?", "yes", "a.png")
    assert prompt_content(job, "<Q>{question}</Q> Think.", False) == [
        {"type": "text", "text": "<Q>Is it red?</Q> Think."}
    ]


def test_a_refused_key_stops_with_one_clear_error(circles, tmp_path, capsys):
    teacher = FakeTeacher(status=401)
    try:
        rc = main(["data", "reason", str(circles), "--output", str(tmp_path / "o.jsonl"), "--teacher_url", teacher.url,
                   "--teacher_model", "fake"])  # fmt: skip
    finally:
        teacher.close()
    err = capsys.readouterr().err
    assert rc == 2 and "HTTP 401" in err and "key" in err and "Traceback" not in err


def test_killed_mid_run_resumes_to_the_uninterrupted_output(circles, tmp_path):
    teacher = FakeTeacher()
    args = ["--teacher_url", teacher.url, "--teacher_model", "fake", "--attempts", "2", "--concurrency", "2"]
    try:
        assert main(["data", "reason", str(circles), "--output", str(tmp_path / "whole.jsonl"), *args]) == 0
        teacher.delay = 0.3  # slow enough to kill it mid-run
        out = tmp_path / "killed.jsonl"
        journal = tmp_path / "killed.attempts.jsonl"
        command = [
            sys.executable,
            "-m",
            "cotune",
            "data",
            "reason",
            str(circles),
            "--output",
            str(out),
            *args,
        ]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})  # fmt: skip
        deadline = time.monotonic() + 300  # the child imports torch first: slow on a busy machine
        while (not journal.exists() or journal.read_text().count("\n") < 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        done_before = len(read_journal(journal))
        assert 6 <= done_before < 24 and not out.exists()
        teacher.delay = 0.0
        assert main(["data", "reason", str(circles), "--output", str(out), *args]) == 0
    finally:
        teacher.close()
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    resumed, whole = read_journal(journal), read_journal(tmp_path / "whole.attempts.jsonl")
    assert len(resumed) == 24 and len({(a["id"], a["attempt"]) for a in resumed}) == 24

    def key(a):
        return (a["id"], a["attempt"])

    assert sorted(resumed, key=key) == sorted(whole, key=key)
