"""Stage-level beam search: scripted judge and sampler pick the intended candidates; the real model runs."""

import pytest

from cotune.data.cot import STAGES, follows_format, parse_stages
from cotune.infer.generate import TokenMeter
from cotune.infer.stage_search import (
    ModelJudge,
    best_of_n,
    knockout,
    parse_choice,
    stage_search,
)


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
