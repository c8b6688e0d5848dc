"""The one batched KV cache: rows that join and leave a running batch, with different pictures and
none, answer as each does alone (transformers' generate), and joining copies no other row's cache."""

from __future__ import annotations

import torch

from cotune.infer.cache import BatchCache
from cotune.infer.generate import encode_prompt, generate_ids, user_message
from cotune.serve.engine import Engine, Job
from cotune.serve.sampling import Sampling


def _items(processor, family, shapes):
    from cotune.data.records import load_samples

    samples = load_samples(shapes["test"])[0]
    first = samples[0].images[:1]
    other = next(s.images[:1] for s in samples if s.images[:1] != first)  # another picture
    pictures = [first, other, [], first]
    questions = ["Which shape?", "What colour is it?", "Say something.", "Describe it."]
    return [
        encode_prompt(processor, family, [user_message(q, n_images=len(p))], p)
        for q, p in zip(questions, pictures)
    ]


def test_rows_joining_and_leaving_a_mixed_batch_answer_as_alone(base, processor, shapes):
    model, family = base
    items = _items(processor, family, shapes)
    lengths = [9, 7, 3, 6]  # the third leaves early; the last joins while the others run
    reference = [generate_ids(model, processor, family, [it], n)[0] for it, n in zip(items, lengths)]
    engine = Engine(model, processor, family, max_batch=2)  # the cache grows past 2 slots on the way
    events = {k: [] for k in range(len(items))}
    tokens = {k: [] for k in range(len(items))}

    def job(k):
        return Job(items[k], "none", Sampling(max_tokens=lengths[k], temperature=0), emit=events[k].append)

    ids_of = engine._accept

    def accept(choice, logits, best):  # the engine's token per row, as it picks it
        before = choice.count
        ids_of(choice, logits, best)
        if choice.count > before:
            tokens[next(k for k, it in enumerate(items) if it is choice.job.item)].append(choice.last)

    engine._accept = accept
    engine.max_batch = 8
    for k in range(3):
        engine.submit(job(k))
    engine._admit()
    engine._step()
    engine._step()
    copied = engine.cache.copied
    engine.submit(job(3))  # joins a batch of three rows (two pictures, one without)
    engine._admit()
    assert engine.cache.copied == copied  # its prefill went into its own slot: nothing copied
    moved = engine.cache.copied
    while engine.choices:
        engine._step()
        assert sorted(c.slot for c in engine.choices) == list(
            range(len(engine.choices))
        )  # no hole runs along
    assert engine.cache.copied > moved  # a row moved down into the slot the early leaver gave back
    assert [tokens[k] for k in range(len(items))] == reference
    assert engine.cache.rows() == 0 and engine.cache.images == []  # every slot and picture freed
    # the two requests with the same picture (and adapter) share its keys and values: two computed
    assert engine.cache.encodes == 2


def test_forks_share_the_image_and_free_slots_are_reused(base, processor, shapes):
    model, family = base
    item = _items(processor, family, shapes)[0]
    engine = Engine(model, processor, family, max_batch=4)
    events: list[dict] = []
    engine.submit(Job(item, "none", Sampling(max_tokens=4, temperature=0), emit=events.append, n=3))
    engine._admit()
    cache: BatchCache = engine.cache
    slots = [c.slot for c in engine.choices]
    assert len(set(slots)) == 3 and len(cache.images) == 1 and cache.images[0].users == 3
    image = cache.images[0]
    assert all(cache.image[s] is image for s in slots)
    # the fork copied the prompt's self-attention keys and values only: no image bytes
    prompt = len(item["input_ids"])
    per_token = sum(2 * k[0, :, 0].nbytes for k in cache.k.values())
    assert cache.copied == 2 * prompt * per_token
    while engine.choices:
        engine._step()
    answers = {}
    for e in events:
        if e["type"] == "delta":
            answers[e["index"]] = answers.get(e["index"], "") + e["text"]
    assert len(set(answers.values())) == 1  # greedy: the three choices agree
    assert cache.rows() == 0 and cache.add() == min(slots)  # a freed slot is taken again
    assert torch.equal(cache.mask[min(slots)], torch.zeros_like(cache.mask[0]))
