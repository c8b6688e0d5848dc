"""``cotune data reason``: four-stage replies written by a teacher for records with a known answer,
kept only when their CONCLUSION gives that answer (``cotune.data.answers.match_answer``: yes/no
with negations, option letters or texts, numbers, aliases).

How LLaVA-CoT built its 100k records: GPT-4o was shown the picture, an instruction describing the
four sections, the question and the standard answer, and replies whose CONCLUSION disagreed were
dropped. Here the answer stays out of the prompt by default (rejection sampling: a right
CONCLUSION was reasoned to, not copied), and goes in as a hint with ``--hint_answer``; each
attempt records which.

Files: ``OUT.attempts.jsonl`` is the journal, one line per attempt, appended and fsynced as each
reply arrives: ``{"id", "attempt", "image", "question", "answer", "reply", "accepted", "why",
"teacher", "hinted", ...}`` (``why``: '' when accepted, 'wrong answer', 'malformed' or 'refused';
the raw material of preference pairs). A rerun skips the (id, attempt) pairs already there, so a
killed run resumes with nothing lost or duplicated. ``OUT.jsonl``, the training file (LLaVA-CoT
JSONL with ``answer`` and the record's other fields), is rebuilt from the journal, in input order,
the first accepted attempt of each record, and written atomically at the end.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cotune.data.answers import answer_kind, match_answer
from cotune.data.cot import follows_format, parse_stages
from cotune.data.journal import append_line, read_journal, write_jsonl_atomic
from cotune.data.sample import DataError, Problem, Sample
from cotune.data.teacher import Teacher, TeacherError, TeacherUnavailable, image_data_url, teacher_key

DEFAULT_PROMPT = """\
Answer the question about the image in four sections, in this order, each inside its own tags:
<SUMMARY> ... </SUMMARY> in a sentence or two, how you will work out the answer.
<CAPTION> ... </CAPTION> what the image shows, above all the parts that matter for the question.
<REASONING> ... </REASONING> step by step, from what the image shows to the answer.
<CONCLUSION> ... </CONCLUSION> the final answer alone, short and direct; for a multiple-choice \
question only the option's letter.
Write nothing outside the four sections, and close every tag, </CONCLUSION> included."""
HINT = "The correct answer is: {answer}. Reason your way to it from the image; do not say that it was given."


@dataclass
class Job:
    """One attempt to ask for: a record (``Sample``) and the attempt's number."""

    sample: Sample
    attempt: int
    question: str
    answer: str
    image: Any  # the image field written to the files: a path (str) or a list of them


@dataclass
class ReasonReport:
    """What ``reason_records`` did."""

    output: Path
    attempts_file: Path
    records: int = 0
    accepted_records: int = 0
    attempts: Counter = field(default_factory=Counter)  # why -> count ('' = accepted), this run and earlier
    failed: int = 0  # requests that failed after every retry (asked again by a rerun)
    last_failure: str = ""
    resumed: int = 0
    tokens: int = 0
    problems: list[Problem] = field(default_factory=list)
    per_class: dict = field(
        default_factory=dict
    )  # answer -> [records, attempts, accepted attempts, accepted records]


def record_question(sample: Sample) -> str:
    """The text of the record's first user turn."""
    user = next(m for m in sample.messages if m["role"] == "user")
    return "\n".join(i["text"] for i in user["content"] if i["type"] == "text").strip()


def record_answer(sample: Sample) -> str:
    """The gold answer: the ``answer`` field, else the first reply's CONCLUSION, else the reply."""
    if str(sample.meta.get("answer", "")).strip():
        return str(sample.meta["answer"]).strip()
    reply = next((m for m in sample.messages if m["role"] == "assistant"), None)
    text = " ".join(i["text"] for i in reply["content"] if i["type"] == "text") if reply else ""
    return parse_stages(text).get("CONCLUSION", text).strip()


def judge(reply: str, job: Job) -> str:
    """'' when ``reply`` is accepted; else why not: 'malformed' or 'wrong answer'."""
    if not follows_format(reply):
        return "malformed"
    meta = job.sample.meta
    options = meta.get("options") if isinstance(meta.get("options"), dict) else None
    aliases = {job.answer: meta["answers"]} if isinstance(meta.get("answers"), list) else None
    kind = (
        meta.get("answer_kind") if meta.get("answer_kind") in ("yes_no", "choice", "number", "text") else None
    )
    kind = kind or answer_kind(job.answer, job.question, options)
    conclusion = parse_stages(reply)["CONCLUSION"]
    ok = match_answer(
        conclusion, job.answer, kind=kind, question=job.question, options=options, aliases=aliases
    )
    return "" if ok else "wrong answer"


def prompt_content(job: Job, instruction: str, hint: bool) -> list[dict]:
    """The user message's parts: the pictures, then the instruction and the question (where the
    instruction has ``{question}``, there; else after it), then the hint when asked for."""
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(ref)}} for ref in job.sample.images]
    if "{question}" in instruction:  # a template: the question goes where it says
        text = instruction.strip().replace("{question}", job.question)
    else:
        text = f"{instruction.strip()}\n\nQuestion: {job.question}"
    if hint:
        text += "\n\n" + HINT.format(answer=job.answer)
    return [*parts, {"type": "text", "text": text}]


# ----------------------------------------------------------------------------- the run


def _image_field(sample: Sample, out_dir: Path, in_root: Path) -> tuple[Any, bool]:
    """Image paths for the output files: relative to the output's folder, or (when the images are
    not under it) to the input's image root; True in the second case (train with data.image_root)."""
    paths = [os.path.abspath(str(ref)) for ref in sample.images if isinstance(ref, str | Path)]
    rel = [os.path.relpath(p, out_dir.resolve()) for p in paths]
    outside = any(r.startswith("..") for r in rel)
    if outside:
        rel = [os.path.relpath(p, in_root.resolve()) for p in paths]
    return (rel[0] if len(rel) == 1 else rel), outside


def load_jobs(
    in_path: Path, out_path: Path, data: Any, attempts: int, limit: int = 0, log=print
) -> tuple[list[Job], list[Problem]]:
    """Every (record, attempt) to ask for, and the records that cannot be used (no image, no answer)."""
    from cotune.data.records import load_samples

    samples, problems = load_samples(
        in_path,
        data.image_root,
        "",
        fmt=data.format,
        columns=data.columns,
        log=log,
        workers=data.image_workers,
    )
    samples = samples[:limit] if limit else samples
    in_root = Path(data.image_root) if data.image_root else in_path.parent
    jobs, seen, outside = [], set(), False
    for s in samples:
        answer = record_answer(s)
        if not s.images or not all(isinstance(r, str | Path) for r in s.images):
            problems.append(Problem(s.where, "no image file (reason needs a picture per record)"))
        elif not answer:
            problems.append(Problem(s.where, "no answer (an 'answer' field or a reply to check against)"))
        elif s.id in seen:
            problems.append(Problem(s.where, f"id '{s.id}' appears twice (resuming needs unique ids)"))
        else:
            seen.add(s.id)
            image, far = _image_field(s, out_path.parent, in_root)
            outside = outside or far
            jobs += [Job(s, k, record_question(s), answer, image) for k in range(attempts)]
    if outside:
        log(f"note: the images are not under {out_path.parent}; their paths are written relative to "
            f"{in_root}: train with --data.image_root {in_root}")  # fmt: skip
    return jobs, problems


def _worker(
    teacher: Teacher, jobs: queue.Queue, results: queue.Queue, stop: threading.Event, ask: Callable
) -> None:
    while not stop.is_set():
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        try:
            results.put((job, teacher, ask(teacher, job), None))
        except Exception as e:  # noqa: BLE001 - any failure is reported by the writer, never lost in a thread
            results.put((job, teacher, None, e))


def _entry(job: Job, teacher: Teacher, reply: Any, hinted: bool) -> dict:
    why = "refused" if reply.text is None else judge(reply.text, job)
    return {
        "id": job.sample.id, "attempt": job.attempt, "image": job.image, "question": job.question,
        "answer": job.answer, "reply": reply.text or "", "accepted": why == "", "why": why,
        "teacher": f"{teacher.model}@{teacher.url}", "hinted": hinted,
        "tokens": reply.completion_tokens, **({"detail": reply.refused} if reply.refused else {}),
    }  # fmt: skip


def _ask_all(
    todo: list[Job], teachers: list[Teacher], opts: Any, seed: int, journal: Path, report: ReasonReport
) -> None:
    """Asks every job, appending each attempt to the journal as it comes back."""
    instruction = Path(opts.prompt_file).read_text(encoding="utf-8") if opts.prompt_file else DEFAULT_PROMPT

    def ask(teacher: Teacher, job: Job):
        content = prompt_content(job, instruction, opts.hint_answer)
        return teacher.ask(content, opts.max_tokens, opts.teacher_temperature, seed + job.attempt)

    jobs, results, stop = queue.Queue(), queue.Queue(), threading.Event()
    for job in todo:
        jobs.put(job)
    threads = [
        threading.Thread(target=_worker, args=(t, jobs, results, stop, ask), daemon=True)
        for t in teachers
        for _ in range(opts.concurrency)
    ]
    for t in threads:
        t.start()
    fatal, accepted, done = None, 0, 0
    bar = tqdm(total=len(todo), desc="reasoning", unit="attempt", dynamic_ncols=True, mininterval=0.5)
    with open(journal, "a", encoding="utf-8") as f:
        while done < len(todo) and (any(t.is_alive() for t in threads) or not results.empty()):
            try:
                job, teacher, reply, error = results.get(timeout=0.2)
            except queue.Empty:
                continue
            done += 1
            bar.update(1)
            if isinstance(error, TeacherError):
                fatal = fatal or error
                stop.set()
            elif error is not None:
                report.failed += 1
                report.last_failure = (
                    f"{type(error).__name__}: {error}"
                    if not isinstance(error, TeacherUnavailable)
                    else str(error)
                )
            else:
                entry = _entry(job, teacher, reply, opts.hint_answer)
                append_line(f, entry)
                report.attempts[entry["why"]] += 1
                report.tokens += reply.completion_tokens
                accepted += entry["accepted"]
            bar.set_postfix(accept=f"{accepted / max(done - report.failed, 1):.0%}", tokens=report.tokens)
    bar.close()
    if fatal is not None:
        raise fatal


def _training_records(jobs: list[Job], entries: list[dict]) -> list[dict]:
    """The first accepted attempt of each record, in input order, as LLaVA-CoT records."""
    best: dict[str, dict] = {}
    for e in entries:
        if e.get("accepted") and (e["id"] not in best or e["attempt"] < best[e["id"]]["attempt"]):
            best[e["id"]] = e
    records, seen = [], set()
    for job in jobs:
        s, e = job.sample, best.get(job.sample.id)
        if e is None or s.id in seen:
            continue
        seen.add(s.id)
        human = "<image>\n" * len(s.images) + job.question
        records.append({
            **s.meta, "id": s.id, "image": job.image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": e["reply"].strip()}],
            "answer": job.answer, "teacher": e["teacher"], "hinted": e["hinted"],
        })  # fmt: skip
    return records


def _per_class(jobs: list[Job], entries: list[dict]) -> dict[str, list[int]]:
    """answer -> [records, attempts, accepted attempts, records with an accepted attempt]."""
    answers = {j.sample.id: j.answer for j in jobs}
    table: dict[str, list[int]] = {}
    for answer in answers.values():
        table.setdefault(answer, [0, 0, 0, 0])[0] += 1
    accepted_ids = set()
    for e in entries:
        if e["id"] in answers:
            row = table[answers[e["id"]]]
            row[1] += 1
            row[2] += bool(e["accepted"])
            if e["accepted"] and e["id"] not in accepted_ids:
                accepted_ids.add(e["id"])
                row[3] += 1
    return table


def reason_records(
    in_path: str | Path, out_path: str | Path, opts: Any, data: Any = None, seed: int = 42, log=print
) -> ReasonReport:
    """Asks the teachers for four-stage replies to every record of ``in_path``; keeps the right ones.

    Args:
        in_path: records with a picture, a question and a known answer (``cotune data import``'s output,
            or any format ``cotune data check`` reads).
        out_path: the training file written (accepted records); attempts go to ``OUT.attempts.jsonl``.
        opts: ``ReasonOptions`` (teachers, prompt, attempts, hint, concurrency, retries).
        data: the ``data`` section (format, columns, image root); None for defaults.
        seed: attempt k of a record is sampled with seed ``seed + k``.

    Returns:
        A ``ReasonReport``; ``report.failed`` counts requests that failed after every retry (a rerun
        asks them again).

    Raises:
        TeacherError: a teacher refuses every request (key, URL, model); what was done is kept.
    """
    from cotune.options.data import DataOptions

    in_path, out_path = Path(in_path), Path(out_path)
    if not opts.teacher_url:
        raise DataError("no teacher: give --teacher_url http://HOST:PORT/v1 (and --teacher_model NAME)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    journal = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".attempts.jsonl")
    jobs, problems = load_jobs(in_path, out_path, data or DataOptions(), opts.attempts, opts.max_records, log)
    report = ReasonReport(
        output=out_path, attempts_file=journal, records=len({j.sample.id for j in jobs}), problems=problems
    )
    earlier = read_journal(journal)
    done = {(e["id"], e["attempt"]) for e in earlier}
    todo = [j for j in jobs if (j.sample.id, j.attempt) not in done]
    report.resumed = len(jobs) - len(todo)
    if report.resumed:
        log(f"resuming: {report.resumed} of {len(jobs)} attempts are already in {journal}")
    teachers = []
    try:
        if todo:
            key = teacher_key(opts.api_key_env)
            teachers = [
                Teacher(u, opts.teacher_model, key, opts.timeout, opts.retries) for u in opts.teacher_url
            ]
            _ask_all(todo, teachers, opts, seed, journal, report)
    finally:
        for t in teachers:
            t.close()
    entries = read_journal(journal)
    wanted = {(j.sample.id, j.attempt) for j in jobs}
    report.attempts = Counter(e["why"] for e in entries if (e["id"], e["attempt"]) in wanted)
    records = _training_records(jobs, entries)
    write_jsonl_atomic(out_path, records)
    report.accepted_records = len(records)
    report.per_class = _per_class(jobs, entries)
    return report


def format_reason_report(r: ReasonReport) -> str:
    """The summary: attempts by outcome, accepted records, per answer class, problems."""
    total = sum(r.attempts.values())
    outcome = ", ".join(f"{n} {why or 'accepted'}" for why, n in r.attempts.most_common())
    lines = [
        f"attempts: {total} ({outcome or 'none'}); accept rate {r.attempts[''] / max(total, 1):.1%}",
        f"records: {r.accepted_records} of {r.records} have an accepted reply -> {r.output}",
        f"every attempt: {r.attempts_file}" + (f" ({r.resumed} from an earlier run)" if r.resumed else ""),
        f"tokens generated this run: {r.tokens}",
    ]
    if r.failed:
        lines.append(
            f"failed: {r.failed} requests after every retry (run the same command again to ask them); "
            f"the last: {r.last_failure}"
        )
    width = max((len(a) for a in r.per_class), default=6)
    lines.append(f"\n  {'answer'.ljust(width)}  records  attempts  accepted  rate   records kept")
    for answer, (n, tried, ok, kept) in sorted(r.per_class.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"  {answer.ljust(width)}  {n:7d}  {tried:8d}  {ok:8d}  {ok / max(tried, 1):4.0%}  {kept:6d}"
        )
    if r.problems:
        lines.append(f"\nproblems ({len(r.problems)}; not reasoned over):")
        lines += [f"  {p}" for p in r.problems]
    return "\n".join(lines)
