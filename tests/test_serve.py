"""cotune serve end to end: a real server on a free port (the tiny Mllama, two different adapters),
talked to with the official openai client. Server and reference run in fp32 on the CPU, where a
batched row's greedy tokens equal the row's alone (bf16 on a GPU may break near-ties differently)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cotune.infer.adapters import load_model_with_adapters, parse_adapter_specs, use_adapter
from cotune.infer.generate import encode_prompt, generate_ids, user_message
from cotune.serve.launch import serve_subprocess
from helpers import make_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key-123"
BASE = "tiny-mllama"


def data_url(path_or_image) -> str:
    from PIL import Image

    image = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def adapters(tiny_mllama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {
        "a": make_adapter(tiny_mllama, root / "a", seed=1),
        "b": make_adapter(tiny_mllama, root / "b", seed=2, targets="language+cross_attention"),
        "c": make_adapter(tiny_mllama, root / "c", seed=3),
    }


@contextlib.contextmanager
def running_server(model_dir, *args: str):
    """A `cotune serve` subprocess on a free port, yielding its base URL; stopped by PID on exit. A
    COTUNE_API_KEY in the environment is not passed on: each test says which key it serves with."""
    env = {k: v for k, v in os.environ.items() if k != "COTUNE_API_KEY"}
    with serve_subprocess(["--model_name", str(model_dir), *args], env=env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(tiny_mllama, adapters):
    """The server's base URL; stopped by PID at the end of the module."""
    with running_server(
        tiny_mllama, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
        "--api_key", KEY, "--reasoning_parser", "llava-cot",
        "--max_model_len", "512", "--max_images", "2", "--max_image_pixels", "250000",
        "--max_body_mb", "1", "--max_batch_size", "16", "--device", "cpu", "--torch_dtype", "fp32",
        "--num_threads", "1",
    ) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_mllama, adapters):
    """The library's generation (what `cotune generate` runs) with the same adapters, in this process."""
    specs = parse_adapter_specs([f"a={adapters['a']}", f"b={adapters['b']}"])
    model, processor, family = load_model_with_adapters(str(tiny_mllama), specs, "fp32", "cpu")

    def answer(adapter: str, text: str, images: list, max_tokens: int) -> list[int]:
        item = encode_prompt(processor, family, [user_message(text, len(images))], images)
        with use_adapter(model, adapter):
            return generate_ids(model, processor, family, [item], max_new_tokens=max_tokens)[0]

    return answer, processor.tokenizer


def ask(client, model, text, images=(), max_tokens=12, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kwargs
    )


def test_model_list_names_the_base_and_each_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "a", "b"}
    assert models["a"].parent == BASE and models["b"].parent == BASE
    assert getattr(models[BASE], "parent", None) is None


def test_greedy_answer_of_each_adapter_equals_library_generation_token_for_token(client, reference, shapes):
    answer, tokenizer = reference
    image = sorted(Path(shapes["images"]).glob("*.png"))[0]
    replies = {}
    for model, adapter in ((BASE, "none"), ("a", "a"), ("b", "b")):
        for images in ([], [image]):
            want = answer(adapter, "How many shapes are there?", [str(p) for p in images], 10)
            got = ask(client, model, "How many shapes are there?", images, 10, temperature=0, logprobs=True)
            tokens = [entry.token for entry in got.choices[0].logprobs.content]
            assert tokens == [tokenizer.decode([t]) for t in want], (model, len(images))
            assert got.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
            assert got.usage.completion_tokens == len(want)
            replies[model, len(images)] = got.choices[0].message.content
    assert len(set(replies.values())) == len(replies), "each adapter answers differently"


def test_streamed_equals_non_streamed_with_usage_last(client, shapes):
    image = sorted(Path(shapes["images"]).glob("*.png"))[1]
    whole = ask(client, "b", "Describe it.", [image], max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="b",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(image)}},
                        {"type": "text", "text": "Describe it."},
                    ],
                }
            ],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_concurrent_requests_mixing_adapters_each_equal_their_sequential_answer(client, server, shapes):
    images = sorted(Path(shapes["images"]).glob("*.png"))
    cases = [
        (["a", "b", BASE][k % 3], f"Question {k}: what {'colour ' * (k % 4)}is it?", images[: k % 3], 4 + k % 6)
        for k in range(12)
    ]  # fmt: skip

    def run(case):
        model, text, imgs, n = case
        return ask(client, model, text, imgs, max_tokens=n, temperature=0).choices[0].message.content

    sequential = [run(case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        concurrent = list(pool.map(run, cases))
    assert concurrent == sequential
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    peak = next(line for line in metrics.splitlines() if line.startswith("cotune_peak_batch_size "))
    assert float(peak.split()[1]) > 1, "the concurrent requests were decoded together"


def test_sampling_settings_per_request(client):
    kwargs = dict(max_tokens=6, temperature=1.0, top_p=0.9)
    first = ask(client, "a", "Pick words.", seed=5, **kwargs).choices[0].message.content
    again = ask(client, "a", "Pick words.", seed=5, **kwargs).choices[0].message.content
    assert first == again
    several = ask(client, "a", "Pick words.", seed=5, n=3, **kwargs)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].message.content == first
    greedy = ask(client, "a", "Pick words.", max_tokens=8, temperature=0).choices[0].message.content
    stop = greedy[3:6]
    cut = ask(client, "a", "Pick words.", max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.find(stop)] and cut.finish_reason == "stop"
    top = ask(client, "a", "Pick words.", max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    entries = top.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 3 for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_hot_load_and_unload(client, server, adapters):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = ask(client, "a", "Hello there", temperature=0).choices[0].message.content
    r = httpx.post(
        f"{server}/v1/load_lora_adapter",
        json={"lora_name": "c", "lora_path": adapters["c"]},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert "c" in {m.id for m in client.models.list().data}
    with_c = ask(client, "c", "Hello there", temperature=0).choices[0].message.content
    assert with_c != before
    assert ask(client, "a", "Hello there", temperature=0).choices[0].message.content == before
    r = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        ask(client, "c", "Hello there", temperature=0)
    for body, param in (
        ({"lora_name": "../x", "lora_path": adapters["c"]}, "lora_name"),
        ({"lora_name": "a", "lora_path": adapters["c"]}, "lora_name"),
        ({"lora_name": "d", "lora_path": "/etc"}, "lora_path"),
        ({"lora_name": "d", "lora_path": "http://example.com/x"}, "lora_path"),
    ):
        r = httpx.post(f"{server}/v1/load_lora_adapter", json=body, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(
        f"{server}/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=headers, timeout=30
    )
    assert r.status_code == 404
    assert ask(client, "a", "Hello there", temperature=0).choices[0].message.content == before


def _png(size, mode="RGB") -> str:
    from PIL import Image

    return data_url(Image.new(mode, size))


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "hi"}


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


BAD = [  # (name, body or raw bytes, status, param)
    ("not json", b"{nope", 400, None),
    ("no model", {"messages": _user(TEXT)}, 400, "model"),
    ("unknown model", {"model": "zzz", "messages": _user(TEXT)}, 404, "model"),
    ("messages not a list", {"model": "a", "messages": "hi"}, 400, "messages"),
    ("bad role", {"model": "a", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("bad part", {"model": "a", "messages": _user({"type": "audio"})}, 400, "messages[0].content[0]"),
    ("http url", {"model": "a", "messages": _user(_image("http://127.0.0.1/x.png"), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("file path", {"model": "a", "messages": _user(_image("/etc/passwd"), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("bad base64", {"model": "a", "messages": _user(_image("data:image/png;base64,@@@"), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("not an image", {"model": "a", "messages": _user(_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("too many images", {"model": "a", "messages": _user(*[_image(_png((8, 8)))] * 3, TEXT)}, 400, "messages"),
    ("too many pixels", {"model": "a", "messages": _user(_image(_png((600, 600))), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("decompression bomb", {"model": "a", "messages": _user(_image(_png((20000, 20000), "1")), TEXT)}, 400, "messages[0].content[0].image_url.url"),
    ("context", {"model": "a", "messages": _user(TEXT), "max_tokens": 500}, 400, "max_tokens"),
    ("max_tokens 0", {"model": "a", "messages": _user(TEXT), "max_tokens": 0}, 400, "max_tokens"),
    ("temperature", {"model": "a", "messages": _user(TEXT), "temperature": 7}, 400, "temperature"),
    ("top_p string", {"model": "a", "messages": _user(TEXT), "top_p": "high"}, 400, "top_p"),
    ("n", {"model": "a", "messages": _user(TEXT), "n": 100}, 400, "n"),
    ("stop", {"model": "a", "messages": _user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("top_logprobs alone", {"model": "a", "messages": _user(TEXT), "top_logprobs": 2}, 400, "top_logprobs"),
    ("search", {"model": "a", "messages": _user(TEXT), "search": "beam"}, 400, "search"),
    ("search streamed", {"model": "a", "messages": _user(TEXT), "search": "stage", "stream": True}, 400, "stream"),
    ("system with image", {"model": "a", "messages": [{"role": "system", "content": "be nice"}, *_user(_image(_png((8, 8))), TEXT)]}, 400, "messages"),
    ("deep json", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("include_usage", {"model": "a", "messages": _user(TEXT), "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    ("body too large", {"model": "a", "messages": _user({"type": "text", "text": "x" * (2 * 2**20)})}, 413, None),
]  # fmt: skip


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_each_bad_request_gets_its_4xx_naming_the_field_and_the_server_still_answers(
    server, client, name, body, status, param
):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert (
        ask(client, "a", "still there?", max_tokens=2, temperature=0).choices[0].message.content is not None
    )


def test_the_api_key_is_required_everywhere_but_health(server):
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(f"{server}{path}", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{server}{path}", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
            == 401
        )
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "a", "messages": _user(TEXT)}, timeout=10)
    assert r.status_code == 401


def test_a_client_that_goes_away_frees_its_rows(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "a", "messages": _user(TEXT), "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server}/metrics", headers=headers, timeout=10).text
        values = dict(line.split(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
        if float(values["cotune_batch_size"]) == 0 and float(values["cotune_requests_cancelled_total"]) >= 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the rows of the abandoned request stayed: {metrics}")
    for name in ("cotune_requests_total", "cotune_generation_tokens_total", "cotune_queue_depth"):
        assert name in values
    assert "cotune_request_latency_seconds_bucket" in metrics


def test_stage_search_is_a_per_request_option_that_reports_its_cost(client):
    reply = ask(client, "a", "How many shapes?", max_tokens=3, temperature=1.0, seed=1,
                extra_body={"search": "stage", "beam_size": 2})  # fmt: skip
    cost = reply.model_extra["search"]
    assert cost["kind"] == "stage" and cost["forward_tokens"] > cost["plain_forward_tokens"]
    assert cost["cost_ratio"] > 1


def test_serve_refuses_a_public_bind_without_a_key(tiny_mllama, monkeypatch, capsys):
    from cotune.cli import main

    monkeypatch.delenv("COTUNE_API_KEY", raising=False)
    assert main(["serve", "--model_name", str(tiny_mllama), "--host", "0.0.0.0"]) == 2
    assert "--api_key" in capsys.readouterr().err


def test_a_4bit_base_serves_an_adapter_as_the_library_answers_on_it(tiny_mllama, adapters, shapes):
    """--quantization 4bit: the server loads the base through the same path as generate (bitsandbytes
    NF4 linears), and its greedy answer with an adapter equals the library's on that 4-bit base."""
    import bitsandbytes as bnb

    specs = parse_adapter_specs([f"a={adapters['a']}"])
    model, processor, family = load_model_with_adapters(
        str(tiny_mllama), specs, "fp32", "cpu", quantization="4bit"
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    image = sorted(Path(shapes["images"]).glob("*.png"))[0]
    item = encode_prompt(processor, family, [user_message("How many shapes are there?", 1)], [str(image)])
    with use_adapter(model, "a"):
        want = generate_ids(model, processor, family, [item], max_new_tokens=10)[0]
    args = (
        "--adapter",
        f"a={adapters['a']}",
        "--quantization",
        "4bit",
        "--torch_dtype",
        "fp32",
        "--device",
        "cpu",
    )
    with running_server(tiny_mllama, *args, "--num_threads", "1") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        got = ask(client, "a", "How many shapes are there?", [image], 10, temperature=0)
    assert got.choices[0].message.content == processor.tokenizer.decode(want, skip_special_tokens=True)
    assert got.usage.completion_tokens == len(want)


def _picture_files(source: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """One picture saved four awkward ways: {kind: (file, mime type)}."""
    from PIL import Image

    picture = Image.open(source).convert("RGB")
    root.mkdir(exist_ok=True)
    files = {}
    rotated = picture.transpose(Image.Transpose.ROTATE_90)  # stored sideways; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(root / "rotated.jpg", format="JPEG", exif=exif.tobytes(), quality=95)
    files["exif-rotated jpeg"] = (root / "rotated.jpg", "jpeg")
    clear = picture.convert("RGBA")
    clear.putalpha(Image.linear_gradient("L").resize(picture.size))  # transparent at the top
    clear.save(root / "clear.png")
    files["transparent png"] = (root / "clear.png", "png")
    grey = Image.fromarray(
        (__import__("numpy").asarray(picture.convert("L"), dtype="uint16") * 4 + 100).astype("uint16")
    )  # a 10-bit scan in a 16-bit file
    grey.save(root / "scan16.png")
    files["16-bit png"] = (root / "scan16.png", "png")
    picture.save(root / "picture.tiff", format="TIFF")
    files["tiff"] = (root / "picture.tiff", "tiff")
    return files


def test_the_server_and_generate_see_the_same_pixels_of_awkward_pictures(
    client, tiny_mllama, adapters, shapes, tmp_path
):
    """One picture path: an EXIF-rotated JPEG, a transparent PNG, a 16-bit PNG and a TIFF give the server
    (data: URLs) the greedy answer and first-token logprob that the library gives on the files."""
    import torch

    from cotune.infer.generate import prompt_batch

    specs = parse_adapter_specs([f"a={adapters['a']}"])
    model, processor, family = load_model_with_adapters(str(tiny_mllama), specs, "fp32", "cpu")
    tokenizer = processor.tokenizer
    files = _picture_files(sorted(Path(shapes["images"]).glob("*.png"))[2], tmp_path / "pictures")
    question = "What colour is the shape?"
    for kind, (path, mime) in files.items():
        item = encode_prompt(processor, family, [user_message(question, 1)], [str(path)])
        want = generate_ids(model, processor, family, [item], max_new_tokens=6)[0]
        with torch.no_grad():
            batch = prompt_batch(model, processor, family, [item])
            logits = model(**family.model_inputs(batch)).logits[0, -1].float()
        want_logprob = float(torch.log_softmax(logits, dim=-1)[want[0]])
        url = f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        got = client.chat.completions.create(
            model="a",
            messages=[{"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
            logprobs=True,
        )
        entries = got.choices[0].logprobs.content
        assert [e.token for e in entries] == [tokenizer.decode([t]) for t in want], kind
        assert abs(entries[0].logprob - want_logprob) < 1e-4, (kind, entries[0].logprob, want_logprob)
