"""eval.md's per-class tables from hand-made replies (no model): scoring -> metrics -> tables."""

from cotune.eval.report import full_report, tracker_figures
from cotune.eval.scoring import answer_metrics, compare_models, generation_metrics

REPLY = (
    "<SUMMARY> s </SUMMARY> <CAPTION> c </CAPTION> <REASONING> r </REASONING> <CONCLUSION> {} </CONCLUSION>"
)
GOLDS = ["Yes", "Yes", "Yes", "No", "No", "No"]


def _model(answers, shuffled=None, probabilities=None):
    m = generation_metrics([REPLY.format(a) for a in answers], GOLDS)
    m.update(
        loss=1.0,
        perplexity=2.7,
        stage_loss=dict.fromkeys(("SUMMARY", "CAPTION", "REASONING", "CONCLUSION", "other"), 1.0),
    )
    m.update(generated_tokens_per_reply=5.0, answers=answer_metrics(m["scores"], "yes", probabilities))
    if shuffled:
        other = generation_metrics([REPLY.format(a) for a in shuffled], GOLDS)
        m["answers_shuffled_images"] = answer_metrics(other["scores"])
        m["accuracy_shuffled_images"] = other["accuracy"]
    return m


def test_tables_show_the_clinical_view_classes_ablation_and_comparison():
    base = _model(["no", "no", "Not sure", "no", "no", "no"])
    adapter = _model(
        ["Yes, there is.", "yes", "No evidence of it", "No.", "There is no crack", "Yes"],
        shuffled=["yes", "yes", "yes", "yes", "yes", "yes"],
        probabilities=[0.9, 0.8, 0.4, 0.2, 0.3, 0.1],
    )
    results = {"models": {"none": base, "run": adapter}}
    results["comparisons"] = compare_models(
        {n: [s["correct"] for s in m["scores"]] for n, m in results["models"].items()}
    )
    b = adapter["answers"]["yes_no"]["binary"]
    assert (b["tp"], b["fn"], b["tn"], b["fp"]) == (2, 1, 2, 1)
    assert adapter["answers"]["yes_no"]["roc_auc"]["value"] == 1.0  # every yes scores above every no
    md = full_report(results)
    assert "| sensitivity | 0.0% (0.0%-56.1%) 0/3 | 66.7% (20.8%-93.9%) 2/3 |" in md
    assert "| specificity | 100.0% (43.9%-100.0%) 3/3 | 66.7% (20.8%-93.9%) 2/3 |" in md
    assert "| no yes/no answer | 1 | 0 |" in md
    assert "| yes: recall, shuffled images | - | 100.0% (43.9%-100.0%) 3/3 |" in md
    assert "| no: recall, shuffled images | - | 0.0% (0.0%-56.1%) 0/3 |" in md
    assert "| gold \\ answer | no | yes |" in md  # the adapter's matrix: every reply answered
    assert "| none -> run | 6 | 50.0% | 66.7% | +16.7%" in md and "exact binomial" in md
    figures = tracker_figures(results)
    assert figures["eval/run/yes_no/roc_auc"] == 1.0 and figures["eval/none/accuracy"] == 0.5
