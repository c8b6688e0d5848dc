"""Llama-3.2-11B-Vision-Instruct's files on tiny weights (the ``tiny_real`` fixture): a tokenizer without a
pad token that transformers reads, an eos list, Meta's template quirks. Every verb runs on it; a record
renders to the same tokens on any day; a process without a quantized base never imports bitsandbytes."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoProcessor

from cotune.data.chat import SystemPromptRefused, system_message, tokenize_conversation
from cotune.demo.tiny import EOS_IDS, IMAGE_ID, PAD_ID
from cotune.infer.generate import encode_prompt, generate_ids, user_message
from cotune.models.families import MLLAMA
from cotune.models.load import load_processor, settle_pad_token

CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "<CONCLUSION> 3 </CONCLUSION>"}]},
]


def test_the_real_files_load_without_a_pad_and_cotune_settles_it(tiny_real):
    """What transformers makes of the files, and what cotune settles: the pad from generation_config, every
    eos id, and the assumptions the tiny tokenizer could hide (BOS, eot vs eos, <|image|>, sizes)."""
    from safetensors import safe_open

    files = json.loads((tiny_real / "tokenizer_config.json").read_text())
    assert "pad_token" not in files and len(files["added_tokens_decoder"]) == 257
    assert (
        json.loads((tiny_real / "special_tokens_map.json").read_text())["pad_token"]
        == "<|finetune_right_pad_id|>"
    )
    assert AutoProcessor.from_pretrained(str(tiny_real)).tokenizer.pad_token is None  # what broke every verb
    tokenizer = load_processor(tiny_real).tokenizer
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|finetune_right_pad_id|>", PAD_ID)
    assert set(MLLAMA.end_of_turn_ids(tokenizer)) == set(EOS_IDS)  # generate, stage search, the server
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.bos_token_id == 128000
    assert (
        tokenizer("hi")["input_ids"][0] == 128000
        and tokenizer("hi", add_special_tokens=False)["input_ids"][0] != 128000
    )
    assert MLLAMA.image_token_id(tokenizer) == IMAGE_ID == len(tokenizer) - 1
    config = json.loads((tiny_real / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_ID and config["text_config"]["vocab_size"] == IMAGE_ID
    with safe_open(str(tiny_real / "model.safetensors"), "pt") as weights:
        rows = {k: weights.get_slice(k).get_shape()[0] for k in weights.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))}  # fmt: skip
    # the embedding has 8 rows past the vocabulary (<|image|> is 128256); the head cannot emit <|image|>
    assert sorted(rows.values()) == [IMAGE_ID, IMAGE_ID + 8]


def test_the_pad_falls_back_in_order_and_an_eos_pad_is_said_once(tiny_real, monkeypatch, capsys):
    import cotune.models.load as load

    bare = AutoProcessor.from_pretrained(str(tiny_real))
    tokenizer = bare.tokenizer

    def fresh():
        tokenizer.pad_token = None  # as the files load it
        return tokenizer

    assert (
        settle_pad_token(fresh(), [PAD_ID + 1]) == "generation_config"
        and tokenizer.pad_token_id == PAD_ID + 1
    )
    assert settle_pad_token(fresh(), None) == "vocabulary" and tokenizer.pad_token_id == PAD_ID
    monkeypatch.setattr(load, "PAD_FALLBACK", "<|not in this vocabulary|>")
    for _ in range(2):
        assert settle_pad_token(fresh(), None, "ckpt") == "eos" and tokenizer.pad_token == "<|eot_id|>"
    assert capsys.readouterr().out.count("has no pad token") == 1
    # padding with the EOS must not take the reply's <|eot_id|> out of the labels
    ids, labels = tokenize_conversation(bare, CONVERSATION)
    assert labels[-1] == ids[-1] == 128009


def _clock(monkeypatch, day: datetime.datetime) -> None:
    """Sets the date the chat template's strftime_now reads."""
    import transformers.utils.chat_template_utils as templates

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(templates, "datetime", Fixed)


def test_a_record_renders_to_the_same_tokens_on_any_day(tiny_real, monkeypatch):
    processor = load_processor(tiny_real)
    tokenizer = processor.tokenizer
    messages = [system_message("Count carefully."), *CONVERSATION]
    ours, theirs = [], []
    for day in (datetime.datetime(2024, 1, 2), datetime.datetime(2031, 5, 6)):
        _clock(monkeypatch, day)
        ours.append(tokenize_conversation(processor, messages))
        theirs.append(processor.apply_chat_template(CONVERSATION, tokenize=False))
    assert ours[0] == ours[1]
    assert theirs[0] != theirs[1] and "Today Date: 06 May 2031" in theirs[1]  # the template reads the clock
    ids, labels = ours[0]
    text = tokenizer.decode(ids)
    assert "Today Date: 26 Jul 2024\n\nCount carefully.<|eot_id|>" in text  # data.date_string's default
    assert "'type'" not in text  # the system message as Meta's template reads it: a string, not a list
    reply = tokenizer("<CONCLUSION> 3 </CONCLUSION>", add_special_tokens=False)["input_ids"]
    assert [t for t in labels if t != -100] == [*reply, 128009] and ids.count(128000) == 1
    processor.date_string = "01 Jan 2030"  # --data.date_string, as the verbs set it
    assert "Today Date: 01 Jan 2030" in tokenizer.decode(tokenize_conversation(processor, messages)[0])


def test_every_verb_that_renders_a_conversation_takes_the_run_s_date(tiny_real, tmp_path):
    from cotune.config import VERBS, load_config, load_options, save_config
    from cotune.infer.adapters import load_model_with_adapters

    run = tmp_path / "config.yaml"
    save_config(load_config(None, [("data.date_string", "01 Jan 2030")]), run)  # a run trained with it
    renders = [v for v in VERBS if v not in ("tiny-model", "synth-data")]
    for verb in renders:  # serve and studio too: the date a run trained with reaches every verb
        assert load_options(verb, run).options.data.date_string == "01 Jan 2030", verb
    _, processor, _ = load_model_with_adapters(str(tiny_real), [], device="cpu", date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030" in processor.tokenizer.decode(
        tokenize_conversation(processor, CONVERSATION)[0]
    )


def test_a_system_prompt_with_images_is_one_error_naming_the_option(tiny_real, shapes, tmp_path, capsys):
    from cotune.cli import main

    argv = ["train", "--model_name", str(tiny_real), "--dataset", str(shapes["train"]), "--output_dir",
            str(tmp_path / "run"), "--max_train_step", "1", "--progress", "False", "--data.system_prompt", "Be brief."]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("data.system_prompt") == 1 and "leave it empty" in err and "train.jsonl:" not in err


@pytest.mark.slow
def test_train_generate_chat_stage_search_eval_and_merge_on_the_real_files(tiny_real, shapes, tmp_path):
    """Every verb on a checkpoint whose tokenizer has no pad token. Train, generate, chat and stage search
    run in one fresh process, which must not import bitsandbytes (no base is quantized) nor print the
    cookbook note (a cotune line), and still trains QLoRA when a 4-bit base comes after."""
    from cotune.cli import main
    from cotune.config import load_config

    run = tmp_path / "run"
    image = str(sorted((shapes["images"]).glob("*.png"))[0])
    script = textwrap.dedent(f"""
        import io, json, sys
        from cotune.cli import main
        from cotune.config import parse_args
        from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
        from cotune.infer.commands import run_chat
        from cotune.infer.generate import user_message
        from cotune.infer.stage_search import stage_search
        codes = [main(["train", "--model_name", "{tiny_real}", "--dataset", "{shapes["train"]}", "--output_dir",
                       "{run}", "--max_train_step", "2", "--batch_size_training", "2", "--run_validation", "False",
                       "--progress", "False", "--lora_config.r", "4"])]
        codes.append(main(["generate", "--model_name", "{tiny_real}", "--adapter", "a={run}/adapter", "--image",
                           "{image}", "--max_new_tokens", "3", "How many shapes?"]))
        cfg = parse_args("chat", ["--model_name", "{tiny_real}", "--max_new_tokens", "3", "--image", "{image}"]).options
        lines = iter(["How many shapes?", "/quit"])
        codes.append(run_chat(cfg, read=lambda _: next(lines), out=io.StringIO()))
        model, processor, family = load_model_with_adapters("{tiny_real}", [AdapterSpec("a", "{run}/adapter")])
        found = stage_search(model, processor, family, [user_message("How many?", 1)], ["{image}"], beam_size=2,
                             max_new_tokens=3, seed=0)
        bnb = "bitsandbytes" in sys.modules
        print("--- 4-bit ---", flush=True)
        print("--- 4-bit ---", file=sys.stderr, flush=True)
        # a 4-bit base later in the same process still gets peft's 4-bit LoRA layers
        from cotune.config import LoraConfig
        from cotune.models.load import add_lora, load_base_model
        quantized = add_lora(*load_base_model("{tiny_real}", quantization="4bit"), LoraConfig(r=4))
        qlora = any(type(m).__module__ == "peft.tuners.lora.bnb" for m in quantized.modules())
        print(json.dumps({{"codes": codes, "stages": len(found.steps), "bitsandbytes": bnb, "qlora": qlora}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0] and result["stages"] > 0
    assert not result["bitsandbytes"], "bitsandbytes was imported without a quantized base"
    assert result["qlora"]
    before = proc.stdout.split("--- 4-bit ---")[0] + proc.stderr.split("--- 4-bit ---")[0]
    assert "gemm_4bit" not in before and "bitsandbytes" not in before and "without --use_peft" not in before
    assert load_config(run / "config.yaml").data.date_string == "26 Jul 2024"  # saved with the run

    assert main(["eval", str(run / "config.yaml"), "--adapter", f"a={run / 'adapter'}", "--data", str(shapes["test"]),
                 "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "2", "--eval.limit", "2"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]["a"]["label_tokens"] > 0
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--model_name",
                str(tiny_real),
                "--adapter",
                str(run / "adapter"),
                "--output",
                str(merged),
            ]
        )
        == 0
    )
    assert load_processor(merged).tokenizer.pad_token_id == PAD_ID


def test_generate_and_the_server_stop_at_every_eos_id_of_the_checkpoint(tiny_real, shapes, tmp_path):
    """A checkpoint whose generation_config.json names one more eos id (as <|eom_id|> is one): generate and
    the server's engine both end the reply right before it, where the same model without it goes on."""
    import threading

    from cotune.infer.adapters import load_model_with_adapters
    from cotune.serve.engine import Engine, Job
    from cotune.serve.sampling import Sampling

    image = sorted((shapes["images"]).glob("*.png"))[0]
    model, processor, family = load_model_with_adapters(str(tiny_real), [], "fp32", "cpu")
    item = encode_prompt(processor, family, [user_message("How many shapes?", 1)], [str(image)])
    free = generate_ids(model, processor, family, [item], max_new_tokens=8)[0]
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopping = tmp_path / "stopping"
    stopping.mkdir()
    for f in tiny_real.iterdir():
        (stopping / f.name).symlink_to(f)
    generation = json.loads((tiny_real / "generation_config.json").read_text())
    (stopping / "generation_config.json").unlink()
    (stopping / "generation_config.json").write_text(
        json.dumps({**generation, "eos_token_id": [*EOS_IDS, free[k]]})
    )
    stopping_processor = load_processor(stopping)
    assert generate_ids(model, stopping_processor, family, [item], max_new_tokens=8)[0] == free[:k]

    events, done = [], threading.Event()
    engine = Engine(model, stopping_processor, family)
    engine.start()
    try:
        job = Job(item, "none", Sampling(max_tokens=8, temperature=0), emit=lambda e: events.append(e) or (e["type"] in ("done", "error") and done.set()))  # fmt: skip
        engine.submit(job)
        assert done.wait(120), events
    finally:
        engine.stop()
    assert job.completion_tokens == k and {"type": "finish", "index": 0, "reason": "stop"} in events
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == processor.tokenizer.decode(free[:k], skip_special_tokens=True)


def test_the_refusal_is_raised_by_the_template_not_by_cotune(tiny_real):
    """The real template refuses a system message with an image; without the option's mark it stays the
    template's own error (a record's own system turn is that record's problem)."""
    from jinja2 import TemplateError

    processor = load_processor(tiny_real)
    image_turn = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        CONVERSATION[1],
    ]
    with pytest.raises(SystemPromptRefused):
        tokenize_conversation(processor, [system_message("Be brief."), *image_turn])
    own = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    with pytest.raises(TemplateError):
        tokenize_conversation(processor, [own, *image_turn])


def test_a_hub_name_is_found_in_the_cache_hf_home_names(tiny_real, tmp_path, monkeypatch):
    """--model_name org/model: the snapshot already in $HF_HOME/hub is used (nothing is downloaded)."""
    from cotune.models.load import check_model_dir

    repo = tmp_path / "hf-home" / "hub" / "models--meta-llama--Llama-3.2-11B-Vision-Instruct"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in tiny_real.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_dir("meta-llama/Llama-3.2-11B-Vision-Instruct")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert check_model_dir("meta-llama/Llama-3.2-11B-Vision-Instruct") == snapshot
    assert load_processor("meta-llama/Llama-3.2-11B-Vision-Instruct").tokenizer.pad_token_id == PAD_ID
