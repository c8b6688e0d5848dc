"""Stage-level beam search: scripted judge and sampler pick the intended candidates; the real model runs."""

import sys
from pathlib import Path

import pytest

from cotune.data.cot import STAGES, follows_format, parse_stages
from cotune.infer.generate import TokenMeter, encode_prompt, generate_ids, prompt_batch, seeded
from cotune.infer.prefix import (
    decode,
    evaluating,
    feed,
    generators,
    image_inputs,
    new_cache,
    one_row,
    sample_with,
)
from cotune.infer.stage_search import (
    ModelJudge,
    ModelSampler,
    best_of_n,
    knockout,
    parse_choice,
    stage_search,
)

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Tokens fed to the language model (padding included) by the recomputing search over those fed by the
# shared-prefix one, in the tests below, less a margin: measured 3.02 for the judging (4,218 / 1,395)
# and 4.36 for a search whose random-model candidates never reach a judge (576 / 132). Counts, not
# timings: deterministic. The demo adapter's figure is in BENCHMARKS.md.
JUDGE_SAVING = 2.8
SEARCH_SAVING = 4.0


@pytest.mark.parametrize(
    "text, choice",
    [
        ("Since it is more accurate, I choose response 2.", 1),
        ("I choose Response 1", 0),
        ("i choose response [2]", 1),
        ("Response 1 is vague. Since response 2 counts all shapes, I choose response 2.", 1),
        ("Response 2 is the better one.", 1),
        ("Both response 1 and response 2 are fine.", None),
        ("<|tiny_unused_5|> blue", None),
    ],
)
def test_parse_choice(text, choice):
    assert parse_choice(text) == choice


def test_knockout_invalid_loses_identical_unjudged_and_odd_bye():
    calls = []

    def decide(pairs):
        calls.append(pairs)
        return [1] * len(pairs)  # the second of each pair wins when judged

    # 0 invalid vs 1 valid -> 1 without judging; 2 vs 3 judged -> 3; 4 gets a bye; then 1 vs 3 -> 3; 3 vs 4 -> 4
    winner, judged = knockout(["x", "a", "b", "c", "d"], [False, True, True, True, True], decide)
    assert winner == 4 and judged == 3
    assert calls == [[(2, 3)], [(1, 3)], [(3, 4)]]
    # identical candidates are not judged; all invalid: the first one stays (no crash)
    assert knockout(["same", "same"], [True, True], decide) == (0, 0)
    assert knockout(["p", "q", "r"], [False, False, False], decide) == (0, 0)


class ScriptedSampler:
    """Returns fixed texts per stage (as token ids) and records the prefixes it was asked to continue."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.prefixes = tokenizer, script, []

    def __call__(self, prefix, stop, n):
        stage = stop.strip("</>")
        self.prefixes.append(self.tokenizer.decode(prefix))
        texts = self.script[stage]
        assert len(texts) == n
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class ScriptedJudge:
    """Prefers the response with the most 'good's; records every pair it was shown."""

    def __init__(self):
        self.seen = []

    def __call__(self, stage, messages, images, context, pairs):
        self.seen += [(stage, a, b) for a, b in pairs]
        return [int(b.count("good") > a.count("good")) for a, b in pairs]


def _script():
    script = {}
    for stage in STAGES:
        sep = "" if stage == "SUMMARY" else "\n\n"
        script[stage] = [
            f"{sep}<{stage}> plain {stage.lower()} </{stage}>",
            f"{sep}<{stage}> good good {stage.lower()} </{stage}>",
            f"{sep}good good good good but no tags at all",  # the judge would love it; it must lose
            f"{sep}<{stage}> good {stage.lower()} </{stage}>",
        ]
    return script


def test_stage_search_picks_the_judged_winner_and_survives_tagless_candidates(base, processor, prompt):
    model, family = base
    sampler, judge = ScriptedSampler(processor.tokenizer, _script()), ScriptedJudge()
    messages, images = prompt
    result = stage_search(
        model, processor, family, messages, images, beam_size=4, judge=judge, sampler=sampler
    )
    assert [step["winner"] for step in result.steps] == [1, 1, 1, 1]
    assert all(step["valid"] == [True, True, False, True] for step in result.steps)
    assert follows_format(result.text)
    assert parse_stages(result.text) == {s: f"good good {s.lower()}" for s in STAGES}
    assert all("no tags" not in a and "no tags" not in b for _, a, b in judge.seen)
    # the judge sees each stage's content, without the tags
    assert ("SUMMARY", "plain summary", "good good summary") in judge.seen
    # each stage continues from the winners of the stages before it
    assert sampler.prefixes[0] == ""
    assert (
        sampler.prefixes[2]
        == "<SUMMARY> good good summary </SUMMARY>\n\n<CAPTION> good good caption </CAPTION>"
    )
    tokens = [
        len(processor.tokenizer(_script()[s][1], add_special_tokens=False)["input_ids"]) for s in STAGES
    ]
    assert result.reply_tokens == sum(tokens)
    assert result.comparisons == 4 * 2  # per stage: 0 v 1 judged, 2 v 3 settled (2 has no tags), 1 v 3 judged


def test_stage_search_without_any_tagged_candidate_does_not_crash(base, processor, prompt):
    model, family = base
    script = {s: ["nothing here", "nor here"] for s in STAGES}
    judge = ScriptedJudge()
    result = stage_search(
        model,
        processor,
        family,
        *prompt,
        beam_size=2,
        judge=judge,
        sampler=ScriptedSampler(processor.tokenizer, script),
    )
    assert result.text == "nothing here" * 4 and judge.seen == []


def test_best_of_n_keeps_a_formatted_reply(base, processor, prompt):
    model, family = base
    full = "".join(_script()[s][1] for s in STAGES)
    better = full.replace("good good", "good good good")
    script = {"CONCLUSION": ["free text without stages, good good good good", full, better, "x"]}
    sampler = ScriptedSampler(processor.tokenizer, script)
    result = best_of_n(model, processor, family, *prompt, n=4, judge=ScriptedJudge(), sampler=sampler)
    assert result.text == better and result.steps[0]["winner"] == 2


def test_stage_search_on_the_model_batches_each_stage(base, processor, prompt):
    """With the real sampler: one batched call per stage; the prompt is fed once; seeded."""
    model, family = base
    judge = ScriptedJudge()
    result = stage_search(
        model, processor, family, *prompt, beam_size=3, max_new_tokens=5, seed=0, judge=judge
    )
    assert result.meter.calls == len(STAGES)  # the tiny random model writes no tags: nothing to judge
    assert len(result.steps) == 4 and all(len(s["candidates"]) == 3 for s in result.steps)
    again = stage_search(
        model, processor, family, *prompt, beam_size=3, max_new_tokens=5, seed=0, judge=judge
    )
    assert again.text == result.text  # seeded
    from cotune.infer.generate import encode_prompt

    prompt_len = len(encode_prompt(processor, family, *prompt)["input_ids"])
    # the prompt is fed once per search: each later stage continues the winner's cache
    assert result.meter.prompt == prompt_len
    assert result.meter.generated == 4 * 3 * 5  # no row of the random model ends early here


def test_model_judge_batches_pairs_and_falls_back_to_logits(base, processor, prompt):
    model, family = base
    meter = TokenMeter()
    judge = ModelJudge(model, processor, family, meter, max_new_tokens=6)
    pairs = [("three shapes", "two shapes"), ("a red circle on the left", "blue")]
    choices = judge("CAPTION", *prompt, "<SUMMARY> count </SUMMARY>", pairs)
    assert all(c in (0, 1) for c in choices)
    assert meter.calls >= 1 and meter.total > 0 and len(judge.transcript) == 2
    # the logit comparison of a batch equals that of each pair alone (left padding is right)
    batched = judge.logit_choice("CAPTION", *prompt, "", pairs)
    assert batched == [judge.logit_choice("CAPTION", *prompt, "", [p])[0] for p in pairs]


# ------------------------------------------------ decoding over a shared prefix against recomputing


@pytest.fixture(scope="module")
def recomputing():
    """bench/stage_search.py: the search's sampler and judge as they were (every prompt re-read), and
    the forward hooks that count tokens and images."""
    sys.path.insert(0, str(BENCH))
    try:
        import stage_search as bench
    finally:
        sys.path.remove(str(BENCH))
    return bench


def _decode_alone(model, processor, family, prompt, prefix, seed, max_new_tokens, temperature=0.7):
    """One candidate from a fresh prefill of the whole prompt, batch of one, its own generator."""
    item = encode_prompt(processor, family, *prompt, prefix)
    batch = prompt_batch(model, processor, family, [item])
    with evaluating(model):
        row = feed(
            model, new_cache(model), [one_row(batch, 0, None, family.token_keys)], image_inputs(family, batch)
        )
        pick = sample_with(temperature, 0.9, generators([seed], "cpu"))
        out, _ = decode(model, row, pick, max_new_tokens, family.end_of_turn_ids(processor.tokenizer))
    return out[0]


def test_batched_candidates_equal_each_candidate_decoded_alone(base, processor, prompt):
    model, family = base
    meter = TokenMeter()
    sampler = ModelSampler(model, processor, family, *prompt, meter, max_new_tokens=8)
    with seeded(0):
        rows = sampler([], None, 3)
    assert rows == [_decode_alone(model, processor, family, prompt, [], s, 8) for s in sampler.seeds]
    assert len(set(map(tuple, rows))) == 3  # three different candidates
    # continuing candidate 1 (as the search continues a stage's winner) starts from its cache
    prefix = rows[1]
    more = sampler(prefix, None, 3)
    assert more == [_decode_alone(model, processor, family, prompt, prefix, s, 8) for s in sampler.seeds]
    prompt_len = len(encode_prompt(processor, family, *prompt)["input_ids"])
    assert meter.prompt == prompt_len  # the prompt once; candidate 1's last token was counted as generated
    # greedy over the shared prefix equals transformers' generate on the whole prompt
    greedy_sampler = ModelSampler(model, processor, family, *prompt, TokenMeter(), 8, temperature=0)
    reference = generate_ids(model, processor, family, [encode_prompt(processor, family, *prompt, prefix)], 8)
    assert greedy_sampler(prefix, None, 2) == reference * 2


def _counted_search(model, processor, family, prompt, bench, recompute, sampler_script=None, judge_tokens=8):
    meter, counter = TokenMeter(), bench.ForwardCounter(model)
    judge_cls = bench.RecomputingJudge if recompute else ModelJudge
    kwargs = dict(judge=judge_cls(model, processor, family, meter, max_new_tokens=judge_tokens))
    if sampler_script is not None:
        kwargs["sampler"] = ScriptedSampler(processor.tokenizer, sampler_script)
    elif recompute:
        kwargs["sampler"] = bench.RecomputingSampler(model, processor, family, *prompt, meter, 8)
    try:
        result = stage_search(
            model, processor, family, *prompt, beam_size=4, max_new_tokens=8, seed=0, **kwargs
        )
    finally:
        counter.close()
    return result, kwargs["judge"], counter


def test_judge_decides_as_the_recomputing_judge_and_feeds_fewer_tokens(base, processor, prompt, recomputing):
    """Greedy judging is deterministic: the same answers and decisions as when every judging prompt
    was fed whole, for fewer tokens (the stage's shared beginning once; the logit fallback continues
    the judged rows)."""
    model, family = base
    script = {}
    for stage in STAGES:  # four valid candidates of different lengths: round one judges two pairs
        words = ["a", "good b b b", "good good c", "d d d d d d good"]
        script[stage] = [f"<{stage}> {w} {stage.lower()} </{stage}>" for w in words]
    new, new_judge, new_count = _counted_search(model, processor, family, prompt, recomputing, False, script)
    old, old_judge, old_count = _counted_search(model, processor, family, prompt, recomputing, True, script)
    assert new.comparisons == old.comparisons == 4 * 3
    assert new_judge.transcript == old_judge.transcript
    assert [s["winner"] for s in new.steps] == [s["winner"] for s in old.steps]
    assert any(t["by_logits"] for t in new_judge.transcript)  # the random model's answers name no response
    assert new_count.images == 1 and old_count.images == 4 * (2 + 2 + 1 + 1)  # judged, then by logits
    assert new_count.fed * JUDGE_SAVING <= old_count.fed


def test_stage_search_feeds_fewer_tokens_and_encodes_the_image_once(base, processor, prompt, recomputing):
    model, family = base
    new, _, new_count = _counted_search(model, processor, family, prompt, recomputing, False)
    old, _, old_count = _counted_search(model, processor, family, prompt, recomputing, True)
    assert new_count.vision_calls == 1 and new_count.images == 1
    assert old_count.images == 4 * 4  # each stage's four rows, each its own copy of the image
    assert new_count.fed * SEARCH_SAVING <= old_count.fed


@pytest.mark.parametrize(
    "head", [4, 256]
)  # 4: the nucleus spills over the head, the whole vocabulary is sorted
def test_sampling_draws_from_transformers_nucleus(head):
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 0.5
    kept = TopPLogitsWarper(0.9)(None, logits / 0.7).isfinite()
    pick = sample_with(0.7, 0.9, generators(range(3), "cpu"), head=head)
    drawn = [pick(logits, [0, 1, 2]) for _ in range(300)]
    for row in range(3):
        tokens = {d[row] for d in drawn}
        assert all(kept[row, t] for t in tokens) and len(tokens) > 50


def test_llava_candidates_over_a_shared_prefix_equal_generate(tiny_llava, prompt):
    """A family without ``encode_images`` passes the pixels to the one prefill (image tokens in the text)."""
    from cotune.models.load import load_base_model, load_processor

    (model, family), processor = load_base_model(tiny_llava), load_processor(tiny_llava)
    greedy_sampler = ModelSampler(model, processor, family, *prompt, TokenMeter(), 6, temperature=0)
    reference = generate_ids(model, processor, family, [encode_prompt(processor, family, *prompt)], 6)
    assert greedy_sampler([], None, 2) == reference * 2


def test_model_judge_keeps_a_stage_prefix_only_for_the_same_image(base, processor, prompt, shapes):
    from cotune.data.records import load_samples

    model, family = base
    messages, image = prompt
    other = load_samples(shapes["test"])[0][1].images[:1]
    pairs = [("three shapes", "two shapes"), ("a red circle", "blue")]
    judge = ModelJudge(model, processor, family, TokenMeter(), max_new_tokens=4)
    judge("CAPTION", messages, image, "", pairs)
    again = judge("CAPTION", messages, other, "", pairs)
    fresh = ModelJudge(model, processor, family, TokenMeter(), max_new_tokens=4)
    assert again == fresh("CAPTION", messages, other, "", pairs)
    assert judge.transcript[2:] == fresh.transcript
    assert judge.cache.encodes == 2  # the second image was fed, not the first one's kept prefix
