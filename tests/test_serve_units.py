"""cotune serve's pieces without a server: stop strings, the llava-cot split, request checks, the queue."""

from __future__ import annotations

import asyncio

import pytest

from cotune.serve.engine import Engine, Job, QueueFull
from cotune.serve.protocol import APIError, Limits, check_length, parse_chat_request
from cotune.serve.reasoning import ReasoningStream, split_llava_cot
from cotune.serve.sampling import Sampling, StopText


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_it():
    pieces = ["Hel", "lo <", "/E", "ND> tail"]
    text = StopText(lambda ids: "".join(pieces[: len(ids)]), ("</END>",))
    sent = [text.add(k) for k in range(len(pieces))]
    assert sent == ["Hel", "lo ", "", ""] and text.stopped and text.text == "Hello "
    plain = StopText(lambda ids: "".join(pieces[: len(ids)]), ())
    assert "".join(plain.add(k) for k in range(4)) + plain.flush() == "".join(pieces)


REPLY = "<SUMMARY>s</SUMMARY>\n<CAPTION>c</CAPTION>\n<REASONING>r</REASONING>\n<CONCLUSION>B</CONCLUSION>"


@pytest.mark.parametrize(
    "reply", [REPLY, "no stages here", "<SUMMARY>cut short", "<SUMMARY>s</SUMMARY><CONCLUSION>A"]
)
def test_llava_cot_split_streamed_in_any_pieces_equals_the_whole(reply):
    whole = split_llava_cot(reply)
    for size in (1, 3, 7):
        stream, got = ReasoningStream(), ["", ""]
        pieces = [reply[i : i + size] for i in range(0, len(reply), size)]
        for k, piece in enumerate(pieces):
            r, c = stream.add(piece, final=k == len(pieces) - 1)
            got = [got[0] + r, got[1] + c]
        assert tuple(got) == whole, size
    if reply == REPLY:
        assert whole[1] == "B" and whole[0].startswith("<SUMMARY>") and "</REASONING>" in whole[0]
    if reply == "no stages here":
        assert whole == ("", reply)


def test_request_checks_name_the_field_and_fit_the_context():
    limits = Limits(max_model_len=100, default_max_tokens=64)
    with pytest.raises(APIError) as e:
        parse_chat_request({"model": "a", "messages": [{"role": "user", "content": 5}]}, limits)
    assert e.value.param == "messages[0].content"
    request = parse_chat_request({"model": "a", "messages": [{"role": "user", "content": "hi"}]}, limits)
    check_length(request, 60, limits)
    assert request.sampling.max_tokens == 40  # the default shrinks to what fits
    given = parse_chat_request(
        {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}, limits
    )
    with pytest.raises(APIError) as e:
        check_length(given, 60, limits)
    assert e.value.param == "max_tokens" and e.value.status == 400


def test_the_queue_is_bounded(base, processor):
    model, family = base
    engine = Engine(
        model, processor, family, max_batch=1, max_queue=2
    )  # not started: nothing leaves the queue
    item = {"input_ids": __import__("torch").tensor([1, 2, 3])}
    for _ in range(2):
        engine.submit(Job(item, "none", Sampling(), emit=lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Job(item, "none", Sampling(), emit=lambda e: None))


def test_a_full_queue_is_a_503_with_retry_after(base, processor):
    from cotune.serve import completions
    from cotune.serve.state import ServerState

    model, family = base
    engine = Engine(model, processor, family, max_batch=1, max_queue=1)
    state = ServerState(engine=engine, base_id="tiny")
    request = parse_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, Limits())
    item = {"input_ids": __import__("torch").tensor([1, 2, 3])}

    async def two():
        completions.submit(state, request, "none", item)
        completions.submit(state, request, "none", item)

    with pytest.raises(APIError) as e:
        asyncio.run(two())
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"


def test_a_request_past_its_time_limit_ends_with_504_and_leaves_the_batch(base, processor):
    import torch

    model, family = base
    engine = Engine(model, processor, family)
    events: list[dict] = []
    item = {"input_ids": torch.tensor([128000, 882, 271, 300, 301])}
    job = Job(item, "none", Sampling(max_tokens=50, temperature=0), emit=events.append, timeout_s=3600)
    engine.submit(job)
    engine._admit()
    engine._step()
    assert len(engine.choices) == 1 and engine.cache.rows() == 1
    job.timeout_s = 0.0
    engine._step()
    assert engine.choices == [] and engine.cache.rows() == 0
    assert events[-1]["type"] == "error" and events[-1]["status"] == 504


def test_serve_takes_the_use_commands_options(tmp_path):
    from cotune.config import parse_args

    argv = ["--model_name", "m", "--adapter", "a=x", "--adapter", "b=y", "--quantization", "4bit"]
    argv += ["--api-key", "K", "--host", "0.0.0.0", "--reasoning-parser", "llava-cot", "--port", "9001"]
    cfg = parse_args("serve", argv).options
    assert cfg.adapter == ["a=x", "b=y"] and cfg.quantization == "4bit"
    assert (cfg.serve.api_key, cfg.serve.host, cfg.serve.port) == ("K", "0.0.0.0", 9001)
    assert cfg.serve.reasoning_parser == "llava-cot"


def test_each_image_is_encoded_once_per_request_whatever_n_and_the_reply_length(base, processor, prompt):
    from cotune.infer.generate import encode_prompt

    model, family = base
    messages, images = prompt
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        engine = Engine(model, processor, family)
        events: list[dict] = []
        item = encode_prompt(processor, family, messages, images)
        engine.submit(Job(item, "none", Sampling(max_tokens=6, temperature=0), emit=events.append, n=2))
        while not any(e["type"] == "done" for e in events):
            engine._admit()
            if engine.choices:
                engine._step()
    finally:
        hook.remove()
    assert len(calls) == 1
    assert sum(e["type"] == "finish" for e in events) == 2


def test_files_only_inside_the_allowed_media_dir(tmp_path):
    from PIL import Image

    from cotune.serve.media import load_image_url

    media, outside = tmp_path / "media", tmp_path / "secret.png"
    media.mkdir()
    Image.new("RGB", (8, 8)).save(media / "a.png")
    Image.new("RGB", (8, 8)).save(outside)
    assert load_image_url("file://a.png", "p", 10_000, str(media)).size == (8, 8)
    assert load_image_url(str(media / "a.png"), "p", 10_000, str(media)).size == (8, 8)
    for url in ("../secret.png", str(outside), "file:///etc/passwd", "http://x/a.png"):
        with pytest.raises(APIError) as e:
            load_image_url(url, "p", 10_000, str(media))
        assert e.value.status == 400 and e.value.param == "p"
    with pytest.raises(APIError):  # no media dir: no file at all
        load_image_url(str(media / "a.png"), "p", 10_000, "")
