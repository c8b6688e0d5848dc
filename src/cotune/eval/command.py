"""``cotune eval``: load the base once with every adapter, evaluate each on a labelled file or a
VLMEvalKit benchmark file, write eval.json, eval.md, the confusion PNGs and predictions.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.config import to_dict
from cotune.data.benchmarks import benchmark_samples, read_vlmeval_tsv
from cotune.data.build import load_data_file
from cotune.data.records import Sample, report_problems
from cotune.eval.ablation import IMAGE_CONDITIONS
from cotune.eval.evaluate import AnswerSettings, evaluate_models
from cotune.eval.report import full_report, tracker_figures, write_results
from cotune.infer.adapters import NONE, AdapterSpec, load_model_with_adapters
from cotune.train.trackers import open_trackers


def eval_samples(cfg: Any, log=print) -> tuple[list[Sample], str]:
    """The samples ``cotune eval`` scores (``eval.benchmark`` or ``data.test_file``) and their file."""
    d, e = cfg.data, cfg.eval
    if e.benchmark:
        rows = read_vlmeval_tsv(e.benchmark)
        samples, source = benchmark_samples(rows, e.benchmark), str(e.benchmark)
        log(f"eval: {len(samples)} questions from the benchmark file {e.benchmark}")
    else:
        samples, problems = load_data_file(cfg, d.test_file, log)
        report_problems(problems, d.on_error, len(samples) + len(problems), log=log)
        source = str(d.test_file)
    if e.limit:
        samples = samples[: e.limit]
    if not samples:
        raise FileNotFoundError(f"{source}: no usable samples to evaluate")
    return samples, source


def _answer_settings(e: Any) -> AnswerSettings:
    """How ``cotune eval`` scores answers, from its ``eval`` options.

    Args:
        e: ``cfg.eval``; with ``benchmark`` set, answers are read from the whole reply (as
            VLMEvalKit scores) and there is no loss (benchmark files have no reference replies).

    Returns:
        The ``AnswerSettings`` that ``evaluate_models`` scores with.
    """
    return AnswerSettings(
        kind=e.answer_kind,
        aliases=e.answer_aliases or None,
        positive=e.positive_class,
        answer_from="reply" if e.benchmark else "conclusion",
        roc=e.roc,
        with_loss=not e.benchmark,
    )


def _write_eval_outputs(cfg: Any, specs: list[AdapterSpec], results: dict[str, Any], log=print) -> None:
    """Writes eval.json, eval.md, predictions.jsonl and the PNGs, reports to the trackers and logs it all.

    Args:
        cfg: ``cotune eval``'s options: ``eval.output_dir`` and ``report_to``.
        specs: the adapters; without ``eval.output_dir`` the files go next to the first adapter
            (its directory's ``eval/``), else to ``./eval``.
        results: ``evaluate_models``'s results with the run's facts added.
        log: where the full report and the written paths go.
    """
    first = next((s.path for s in specs if s.path), None)
    out_dir = cfg.eval.output_dir or (str(Path(first).parent / "eval") if first else "eval")
    paths = write_results(results, out_dir)
    trackers = open_trackers(cfg, to_dict(cfg), Path(out_dir), True, None)  # --report_to (none by default)
    trackers.log(tracker_figures(results), 0)
    trackers.finish({"eval_md": str(paths["md"])})
    log(full_report(results))
    pngs = ", ".join(str(p) for p in paths["png"])
    log(
        f"eval: wrote {paths['json']}, {paths['md']}, {paths['predictions']}"
        + (f" and {pngs}" if pngs else "")
    )


def run_eval(cfg: Any, specs: list[AdapterSpec], log=print) -> dict[str, Any]:
    """What ``cotune eval`` runs: load once, evaluate the base ('none') and every adapter, write the files.

    Args:
        cfg: ``cotune eval``'s options (``cotune.config``): the model (``model_name``,
            ``tokenizer_name``, ``torch_dtype``, ``device``), ``data`` (the file ``test_file``,
            read, rendered and length-limited exactly as training does: format, columns, image_root,
            system_prompt, on_error, max_seq_len, overlength), ``generation.max_new_tokens`` and
            ``eval`` (batch_size, limit, image_ablation, output_dir, benchmark, answer_kind,
            answer_aliases, positive_class, roc) and ``report_to`` (the headline figures go to the
            trackers, ``report.tracker_figures``).
        specs: the adapters. The base is evaluated too unless ``specs`` is only ``none`` (then it
            alone is). With ``eval.image_ablation``, every model is also evaluated with shuffled and
            with blank images.
        log: where progress and the tables go.
    """
    d, e, max_new_tokens = cfg.data, cfg.eval, cfg.generation.max_new_tokens
    names = [s.name for s in specs]
    if NONE not in names:
        names = [NONE, *names]
    samples, source = eval_samples(cfg, log)
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name,
        cfg.quantization, cfg.quantization_config, d.date_string,
    )  # fmt: skip
    answers = _answer_settings(e)
    conditions = tuple(IMAGE_CONDITIONS) if e.image_ablation else ("true",)
    results = evaluate_models(
        model, processor, family, samples, names, e.batch_size, max_new_tokens, d.max_seq_len, log,
        conditions, overlength=d.overlength, answers=answers,
    )  # fmt: skip
    results.update(
        image_conditions=list(conditions),
        data=source,
        benchmark=bool(e.benchmark),
        group_name="category" if e.benchmark else "task",
        n_samples=len(samples),
        model_name=str(cfg.model_name),
        adapters={s.name: s.path for s in specs if s.path},
        max_new_tokens=max_new_tokens,
        max_seq_len=d.max_seq_len,
        answer_settings={
            "kind": e.answer_kind,
            "aliases": e.answer_aliases,
            "positive_class": e.positive_class,
        },
    )
    _write_eval_outputs(cfg, specs, results, log)
    return results


def run_eval_command(cfg: Any) -> int:
    """``cotune eval``: the base and each adapter on ``data.test_file`` (read as training reads it)
    or on ``eval.benchmark`` (a VLMEvalKit TSV)."""
    from cotune.config import ConfigError
    from cotune.infer.commands import adapter_specs

    if not cfg.data.test_file and not cfg.eval.benchmark:
        raise ConfigError(
            "cotune eval needs --data TEST.jsonl (or data.test_file in CONFIG.yaml): a labelled file, "
            "or --benchmark FILE.tsv (a VLMEvalKit-layout benchmark file)"
        )
    run_eval(cfg, adapter_specs(cfg))
    return 0
