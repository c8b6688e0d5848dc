"""A tiny checkpoint's files laid out as Llama-3.2-11B-Vision-Instruct's are, where cotune must cope.

``build_tiny_mllama(..., real_layout=True)`` writes its checkpoint, then ``write_real_layout`` makes
these files look like the real ones in the respects that broke verbs or renderings before:

* ``tokenizer_config.json`` lists ``added_tokens_decoder`` (Llama 3's 256 special tokens and
  ``<|image|>``) and names no pad token; the pad appears only in ``special_tokens_map.json``, which
  transformers 5 does not read (so the tokenizer loads with ``pad_token = None``); it sets
  ``clean_up_tokenization_spaces: true``, which transformers 5 ignores for BPE with a warning;
* ``generation_config.json`` ends generation on a list of ids (``<|end_of_text|>``, ``<|eom_id|>``,
  ``<|eot_id|>``), names ``pad_token_id`` 128004 and samples by default (``do_sample``,
  ``temperature`` 0.6, ``top_p`` 0.9), as the real file does;
* the chat template behaves as Meta's for the 11B (tools aside): it reads a system message's content
  with ``trim`` (a string: a list of items would print as Python text), stamps ``Today Date:`` from
  ``strftime_now`` into every conversation without an image, and refuses a system message together
  with an image.
"""

from __future__ import annotations

import json
from pathlib import Path

# Meta's 11B template, rewritten for the features cotune uses (no tools): same text out, same quirks.
REAL_MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}"
    '{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
    '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endfor %}"
    '{%- if image_ns.has_images and not system_message == "" %}'
    '{{- raise_exception("Prompting with images is incompatible with system messages.") }}'
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    '{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

PAD_TOKEN = "<|finetune_right_pad_id|>"


def _added_tokens_decoder(tokenizer_json: dict) -> dict:
    """The ``added_tokens_decoder`` entries of the real file: one per added token, by id."""
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {str(t["id"]): {k: t[k] for k in keys} for t in tokenizer_json["added_tokens"]}


def write_real_layout(out_dir: str | Path) -> Path:
    """Rewrites a tiny Mllama checkpoint's tokenizer and generation files as the real ones are laid
    out (see the module docstring); the weights, vocabulary and image processor are left as they are.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    config = json.loads((out / "tokenizer_config.json").read_text())
    special = {"bos_token": config["bos_token"], "eos_token": config["eos_token"], "pad_token": PAD_TOKEN}
    config.pop("pad_token", None)
    config.update(
        added_tokens_decoder=_added_tokens_decoder(json.loads((out / "tokenizer.json").read_text())),
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        tokenizer_class="PreTrainedTokenizerFast",
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    generation = json.loads((out / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.6, top_p=0.9)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": REAL_MLLAMA_CHAT_TEMPLATE}, indent=2)
    )
    return out
