"""Generation: streaming equals batch output, seeded sampling, several adapters on one base."""

import pytest
import torch
from peft import PeftModel

from cotune.cli import main
from cotune.config import parse_args
from cotune.infer.adapters import NONE, attach_adapters, parse_adapter_specs, use_adapter
from cotune.infer.commands import CHAT_HELP, run_chat
from cotune.infer.generate import (
    TokenMeter,
    encode_prompt,
    generate,
    prompt_batch,
    stream_generate,
    user_message,
)
from cotune.models.load import load_base_model
from helpers import make_adapter


@pytest.fixture(scope="module")
def adapters(tiny_mllama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_mllama, root / "a", seed=1),
        "b": make_adapter(tiny_mllama, root / "b", seed=2, targets="language+cross_attention"),
    }


def test_user_message_places_images_like_records():
    assert user_message("hi", 2)["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "hi"},
    ]
    marked = user_message("<image>\nWhat is it?", 1)["content"]
    assert marked == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    with pytest.raises(ValueError, match="markers"):
        user_message("<image> and <image>", 1)


def test_streaming_equals_batch_generation(base, processor, prompt):
    model, family = base
    messages, images = prompt
    for kwargs in (dict(), dict(do_sample=True, temperature=1.0, top_p=1.0, seed=7)):
        batch = generate(model, processor, family, [(messages, images)], max_new_tokens=16, **kwargs)[0]
        pieces = list(
            stream_generate(model, processor, family, messages, images, max_new_tokens=16, **kwargs)
        )
        assert len(batch) > 0
        assert "".join(pieces) == batch


def test_seeded_sampling_is_reproducible_and_counted(base, processor, prompt):
    model, family = base
    messages, images = prompt
    meter = TokenMeter()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0)
    first = generate(model, processor, family, [(messages, images)] * 3, seed=3, meter=meter, **kw)
    again = generate(model, processor, family, [(messages, images)] * 3, seed=3, **kw)
    other = generate(model, processor, family, [(messages, images)] * 3, seed=4, **kw)
    assert first == again
    assert first != other
    prompt_len = len(encode_prompt(processor, family, messages, images)["input_ids"])
    assert meter.calls == 1 and meter.prompt == 3 * prompt_len
    assert 3 <= meter.generated <= 3 * 8


def test_parse_adapter_specs():
    specs = parse_adapter_specs(["med=runs/med/adapter", "runs/qa/adapter", "none", "runs/qa/best_adapter"])
    assert [(s.name, s.path) for s in specs] == [
        ("med", "runs/med/adapter"),
        ("qa", "runs/qa/adapter"),
        (NONE, None),
        ("qa-best", "runs/qa/best_adapter"),
    ]
    with pytest.raises(ValueError, match="twice"):
        parse_adapter_specs(["x=a", "x=b"])
    with pytest.raises(ValueError, match="reserved"):
        parse_adapter_specs(["none=runs/a"])


def _logits(model, processor, family, prompt):
    messages, images = prompt
    batch = prompt_batch(model, processor, family, [encode_prompt(processor, family, messages, images)])
    with torch.no_grad():
        return model(**batch).logits


def test_adapter_switching_gives_each_adapters_own_logits(tiny_mllama, adapters, processor, prompt):
    shared_base, family = load_base_model(tiny_mllama)
    model = attach_adapters(shared_base, parse_adapter_specs([f"{k}={v}" for k, v in adapters.items()]))
    plain, _ = load_base_model(tiny_mllama)
    reference = {NONE: _logits(plain, processor, family, prompt)}
    for name, path in adapters.items():
        alone, _ = load_base_model(tiny_mllama)
        reference[name] = _logits(PeftModel.from_pretrained(alone, path), processor, family, prompt)
    assert (reference["a"] - reference["b"]).abs().max() > 1e-3  # the adapters really differ
    assert (reference["a"] - reference[NONE]).abs().max() > 1e-3
    for name in ["b", NONE, "a", "b", NONE]:  # switch back and forth, never reloading
        with use_adapter(model, name):
            got = _logits(model, processor, family, prompt)
        torch.testing.assert_close(got, reference[name], rtol=1e-5, atol=1e-5)
    # generate(adapter=...) switches per call, as the single-adapter model generates
    messages, images = prompt
    alone, _ = load_base_model(tiny_mllama)
    single = PeftModel.from_pretrained(alone, adapters["b"])
    want = generate(single, processor, family, [(messages, images)], max_new_tokens=8)
    assert generate(model, processor, family, [(messages, images)], max_new_tokens=8, adapter="b") == want
    with pytest.raises(ValueError, match="not loaded"):
        with use_adapter(model, "c"):
            pass


def test_generate_command_with_several_adapters(tiny_mllama, adapters, prompt, capsys):
    image = str(prompt[1][0])
    argv = [
        "generate",
        "--model_name",
        str(tiny_mllama),
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        "none",
    ]
    argv += ["--image", image, "--max_new_tokens", "4", "How many shapes?"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "--- a ---" in captured.out and "--- none ---" in captured.out
    assert captured.err.count("[cost]") == 2


def test_chat_switches_adapter_between_turns(tiny_mllama, adapters, processor, prompt):
    """Each turn is answered by the adapter chosen for it: its reply is what that adapter alone generates
    (greedy) for the conversation so far, so a switch that does nothing fails."""
    import io

    cfg = parse_args(
        "chat",
        ["--model_name", str(tiny_mllama), "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
         "--max_new_tokens", "6", "--image", str(prompt[1][0])],
    ).options  # fmt: skip
    lines = iter(["How many shapes?", "/adapter b", "And now?", "/adapter zzz", "/quit"])
    out = io.StringIO()
    assert run_chat(cfg, read=lambda _: next(lines), out=out) == 0

    def alone(name, messages):
        model, family = load_base_model(tiny_mllama)
        single = PeftModel.from_pretrained(model, adapters[name])
        return generate(single, processor, family, [(messages, prompt[1][:1])], max_new_tokens=6)[0]

    first = [user_message("How many shapes?", 1)]
    reply_a = alone("a", first)
    second = [*first, {"role": "assistant", "content": [{"type": "text", "text": reply_a}]}]
    second.append(user_message("And now?", 0))
    reply_b = alone("b", second)
    assert reply_b != alone("a", second), "the adapters must answer the second turn differently"
    assert f"(using a)\n{CHAT_HELP}\n{reply_a}\nusing b\n{reply_b}\nno adapter 'zzz'" in out.getvalue()


def test_stop_on_text_ends_a_row_when_its_text_completes_the_stop_string(processor):
    from cotune.infer.generate import StopOnText

    tokenizer = processor.tokenizer
    prompt = tokenizer("ignore </SUMMARY> in the prompt", add_special_tokens=False)["input_ids"]
    reply = tokenizer("<SUMMARY> plan </SUMMARY>\n\n<CAPTION>", add_special_tokens=False)["input_ids"]
    stop = StopOnText(tokenizer, ["</SUMMARY>"], prompt_len=len(prompt))
    fired = []
    for k in range(1, len(reply) + 1):
        ids = torch.tensor([prompt + reply[:k], prompt + reply[:1] * k])  # row 2 never completes it
        fired.append(stop(ids, None).tolist())
    first = next(k for k, (a, _) in enumerate(fired) if a)
    assert "</SUMMARY>" in tokenizer.decode(reply[: first + 1]) and "</SUMMARY>" not in tokenizer.decode(
        reply[:first]
    )
    assert not any(b for _, b in fired)


@pytest.mark.parametrize("image", ["http://example.com/a.png", "nope.png", "empty.png"])
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_an_unusable_image_is_a_one_line_error(tiny_mllama, tmp_path, monkeypatch, capsys, verb, image):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    # refused before the model loads: chat never reads a line (stdin is closed under pytest)
    assert main([verb, "--model_name", str(tiny_mllama), "--image", image, "How many shapes?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cotune {verb}: error: image") and f"'{image}'" in err
    assert err.count("\n") == 1 and "data.image_root" not in err  # generate and chat have no such option


def test_chat_refuses_an_unusable_image_and_keeps_the_conversation(tiny_mllama, tmp_path):
    import io

    cfg = parse_args("chat", ["--model_name", str(tiny_mllama), "--max_new_tokens", "2"]).options
    missing, remote = str(tmp_path / "nope.png"), "https://example.com/a.png"
    lines = iter([f"/image {missing}", f"/image {remote}", "How many shapes?", "/quit"])
    out = io.StringIO()
    assert run_chat(cfg, read=lambda _: next(lines), out=out) == 0
    text = out.getvalue()
    assert f"error: image file '{missing}' not found\n" in text
    assert f"error: image '{remote}' is a URL" in text
    assert "will go with your next message" not in text and "data.image_root" not in text
    assert "error:" not in text.split("is a URL")[1]  # the question is answered, without the images


def test_eval_with_no_usable_image_is_a_one_line_error(tiny_mllama, shapes, tmp_path, capsys):
    records = shapes["test"].read_text().splitlines()[:2]
    data = tmp_path / "remote.jsonl"
    data.write_text("".join(r.replace('"image": "', '"image": "http://example.com/') + "\n" for r in records))
    argv = ["eval", "--model_name", str(tiny_mllama), "--adapter", "none", "--data", str(data)]
    assert main([*argv, "--output_dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"cotune eval: error: {data}: no usable samples to evaluate"
    assert "Traceback" not in err
