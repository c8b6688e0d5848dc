"""Label masking, checked token by token; exactly one BOS; agreement with the processor's own text."""

from __future__ import annotations

import pytest

from cotune.data.chat import IGNORE_INDEX, render_with_reply_spans, tokenize_conversation
from cotune.data.sample import conversation_to_messages

BOS, START, END, EOT, IMAGE = 128000, 128006, 128007, 128009, 128256
USER, ASSISTANT, SYSTEM = 882, 78191, 9125


def two_turns():
    return conversation_to_messages(
        [
            ("user", "<image>\nHow many shapes?"),
            ("assistant", "<SUMMARY> count </SUMMARY> <CONCLUSION> 3 </CONCLUSION>"),
            ("user", "And their colour?"),
            ("assistant", "<CONCLUSION> red </CONCLUSION>"),
        ],
        n_images=1,
    )


def segments(ids, labels):
    """Contiguous runs of labelled tokens."""
    runs, current = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t, "a label must equal its input token"
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_multi_turn_masking_token_by_token(processor):
    tok = processor.tokenizer
    ids, labels = tokenize_conversation(processor, two_turns())
    assert len(ids) == len(labels)
    assert ids.count(BOS) == 1 and ids[0] == BOS
    assert ids.count(IMAGE) == 1
    runs = segments(ids, labels)
    # exactly the two replies, each with its closing <|eot_id|>
    assert len(runs) == 2
    assert tok.decode(runs[0]) == "<SUMMARY> count </SUMMARY> <CONCLUSION> 3 </CONCLUSION><|eot_id|>"
    assert tok.decode(runs[1]) == "<CONCLUSION> red </CONCLUSION><|eot_id|>"
    # every other token is masked: walk the sequence and classify each token
    text_user = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "How many shapes?" in text_user and "And their colour?" in text_user
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if t in (BOS, START, END, IMAGE, USER) or (t == ASSISTANT and ids[i - 1] == START):
            assert lab == IGNORE_INDEX, f"token {i} ({tok.decode([t])!r}) must not be in the loss"
    # the user turns' <|eot_id|> are masked, the assistants' are not
    eot_positions = [i for i, t in enumerate(ids) if t == EOT]
    assert [labels[i] != IGNORE_INDEX for i in eot_positions] == [False, True, False, True]
    # the "\n\n" after the assistant header is part of the prompt, not the reply
    first = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    assert tok.decode(ids[first - 4 : first]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_text_matches_processor_chat_template(processor):
    messages = two_turns()
    text, spans = render_with_reply_spans(processor, messages)
    assert text == processor.apply_chat_template(messages, tokenize=False)
    assert [text[a:b] for a, b in spans] == [
        "<SUMMARY> count </SUMMARY> <CONCLUSION> 3 </CONCLUSION><|eot_id|>",
        "<CONCLUSION> red </CONCLUSION><|eot_id|>",
    ]
    ids, _ = tokenize_conversation(processor, messages)
    assert processor.tokenizer.decode(ids) == text


def test_system_prompt_text_only_is_masked(processor):
    messages = conversation_to_messages(
        [("user", "Hi"), ("assistant", "Hello!")], 0, system_prompt="Be brief."
    )
    ids, labels = tokenize_conversation(processor, messages)
    assert ids.count(BOS) == 1
    assert SYSTEM in ids
    runs = segments(ids, labels)
    assert [processor.tokenizer.decode(r) for r in runs] == ["Hello!<|eot_id|>"]


def test_cookbook_double_bos_is_avoided(processor):
    # the cookbook path tokenizes the template's text with add_special_tokens=True: two BOS
    text = processor.apply_chat_template(two_turns(), tokenize=False)
    assert processor.tokenizer(text)["input_ids"][:2] == [BOS, BOS]
    ids, _ = tokenize_conversation(processor, two_turns())
    assert ids[:2] != [BOS, BOS]


@pytest.mark.parametrize(
    "turns, reason",
    [
        ([("assistant", "hi"), ("user", "q")], "reply before any question"),
        ([("user", "q"), ("user", "q2"), ("assistant", "a")], "must alternate"),
        ([("user", "q")], "does not end with a reply"),
        ([("user", "<image> <image> q"), ("assistant", "a")], "2 '<image>' markers but 1 images"),
    ],
)
def test_structural_problems(turns, reason):
    with pytest.raises(ValueError, match=reason):
        conversation_to_messages(turns, n_images=1)
