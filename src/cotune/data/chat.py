"""Messages -> text -> input_ids and labels. The label-masking rules live here and only here.

The rules:
  * the text is rendered by the checkpoint's own chat template (so it is exactly what the model
    sees at inference);
  * labels are exactly the assistant replies plus the end-of-turn token that closes each of them;
    everything else (BOS, system, user turns, role headers, image tokens, padding) is -100;
  * there is exactly one BOS token, at the start.

Reply spans are found without knowing the template: rendering the conversation up to a reply with
``add_generation_prompt=True`` gives the text before the reply; rendering it including the reply
gives the text after. The difference is the reply and its end-of-turn marker.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from cotune.options.data import DEFAULT_DATE_STRING
from cotune.options.fields import ConfigError

IGNORE_INDEX = -100
# Key of a system message that ``data.system_prompt`` added (not the record): templates ignore it; a
# refusal then names the option once instead of failing every record.
FROM_OPTION = "cotune_option"
SYSTEM_PROMPT_OPTION = "data.system_prompt"


class SystemPromptRefused(ConfigError):
    """The chat template refuses ``data.system_prompt`` in a conversation with images (Llama 3.2
    Vision's does): one error before any work, not a skipped record each."""


def system_message(text: str) -> dict:
    """The system message ``data.system_prompt`` adds to a conversation."""
    return {"role": "system", "content": [{"type": "text", "text": text}], FROM_OPTION: SYSTEM_PROMPT_OPTION}


def _has_images(messages: list[dict]) -> bool:
    return any(
        isinstance(item, dict) and item.get("type") == "image"
        for m in messages
        if not isinstance(m["content"], str)
        for item in m["content"]
    )


_SYSTEM_AS_STRING: dict[str, bool] = {}


def _system_wants_string(processor: Any) -> bool:
    """Whether the template prints a system message's content as it is (Meta's Llama 3.x templates
    ``trim`` it: a list of items would be rendered as its Python text), so it needs a string."""
    template = str(getattr(processor, "chat_template", None) or "")
    if template not in _SYSTEM_AS_STRING:
        probe = [
            {"role": "system", "content": [{"type": "text", "text": "probe"}]},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ]
        try:
            text = processor.apply_chat_template(probe, tokenize=False, date_string=DEFAULT_DATE_STRING)
        except (TemplateError, TypeError, ValueError):
            text = ""
        _SYSTEM_AS_STRING[template] = "'type'" in text
    return _SYSTEM_AS_STRING[template]


def _as_template_reads(processor: Any, messages: list[dict]) -> list[dict]:
    if not messages or messages[0]["role"] != "system" or isinstance(messages[0]["content"], str):
        return messages
    if not _system_wants_string(processor):
        return messages
    items = messages[0]["content"]
    text = "".join(i.get("text", "") for i in items if isinstance(i, dict) and i.get("type") == "text")
    return [{**messages[0], "content": text}, *messages[1:]]


def _render(processor: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text, with the processor's fixed ``date_string`` (``load_processor``)."""
    date = getattr(processor, "date_string", None) or DEFAULT_DATE_STRING
    try:
        return processor.apply_chat_template(
            _as_template_reads(processor, messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            date_string=date,
        )
    except TemplateError as e:
        if messages and messages[0].get(FROM_OPTION) and _has_images(messages):
            raise SystemPromptRefused(
                f"the chat template refuses a system message in a conversation with images ({e}); "
                f"option '{SYSTEM_PROMPT_OPTION}' adds one to every conversation: leave it empty, or put "
                "the instruction into the user turns of the data"
            ) from None
        raise


def render_with_reply_spans(processor: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Renders the conversation and finds the character span of each assistant reply.

    Returns:
        The full text and a list of (start, end) character offsets, one per assistant message,
        each covering the reply and the end-of-turn marker after it.

    Raises:
        ValueError: when the template renders a prefix differently from the whole (then spans
            cannot be located safely).
    """
    full = _render(processor, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, messages[:k], add_generation_prompt=True)
        upto = _render(processor, messages[: k + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise ValueError("the chat template renders a conversation prefix differently from the whole")
        spans.append((len(before), len(upto)))
    return full, spans


def expand_image_tokens(text: str, image_token: str, tokens_per_image: int) -> str:
    """LLaVA-style models need one placeholder token per image patch; Mllama needs one per image."""
    if tokens_per_image <= 1:
        return text
    return text.replace(image_token, image_token * tokens_per_image)


def tokenize_conversation(
    processor: Any, messages: list[dict], image_token: str = "<|image|>", tokens_per_image: int = 1
) -> tuple[list[int], list[int]]:
    """Renders and tokenizes a conversation and builds its labels.

    Args:
        processor: the checkpoint's processor (chat template + fast tokenizer).
        messages: chat messages (content as image/text items).
        image_token: the family's image placeholder token.
        tokens_per_image: copies of the image token per image (see ``ModelFamily.tokens_per_image``).

    Returns:
        (input_ids, labels), equal length; labels are -100 outside assistant replies.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    text, spans = render_with_reply_spans(processor, messages)
    if tokens_per_image > 1:
        # expand every rendering the same way so the spans still line up
        pieces, cursor, new_spans = [], 0, []
        for start, end in spans:
            pieces.append(expand_image_tokens(text[cursor:start], image_token, tokens_per_image))
            new_start = sum(map(len, pieces))
            pieces.append(text[start:end])
            new_spans.append((new_start, new_start + end - start))
            cursor = end
        pieces.append(expand_image_tokens(text[cursor:], image_token, tokens_per_image))
        text, spans = "".join(pieces), new_spans
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_iter = iter(sorted(spans))
    span = next(span_iter, None)
    for i, (start, _end) in enumerate(offsets):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is not None and span[0] <= start < span[1]:
            labels[i] = input_ids[i]
    bos = tokenizer.bos_token_id
    if bos is not None:
        if not input_ids or input_ids[0] != bos:
            input_ids, labels = [bos, *input_ids], [IGNORE_INDEX, *labels]
        if input_ids.count(bos) != 1:
            raise ValueError(f"rendered text holds {input_ids.count(bos)} BOS tokens; expected exactly one")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    # a pad token in the text is masked, unless the pad is the EOS that ends each reply (a tokenizer
    # without a pad token pads with its EOS: ``load_processor``), which the model must learn
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id != tokenizer.eos_token_id else None
    labels = [IGNORE_INDEX if t in (image_id, pad_id) else lab for t, lab in zip(input_ids, labels)]
    return input_ids, labels


def prompt_ids(
    processor: Any, messages: list[dict], image_token: str = "<|image|>", tokens_per_image: int = 1
) -> list[int]:
    """Token ids of a prompt ending with the assistant header, ready for generation (one BOS)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    text = expand_image_tokens(
        _render(processor, messages, add_generation_prompt=True), image_token, tokens_per_image
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return list(ids)
