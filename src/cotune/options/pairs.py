"""The section of ``cotune data pairs``: where preference pairs come from and how many."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import opt


@dataclass
class PairsOptions:
    """cotune data pairs: preference pairs from reasoned attempts, the adapter's samples, or stage search."""

    source: str = opt(
        "samples",
        "attempts (a cotune data reason OUT.attempts.jsonl: accepted vs rejected attempts of a record), "
        "samples (n sampled replies of the adapter per record, right vs wrong against the known answer) "
        "or stages (stage search: the winning vs a losing candidate of one stage, the rest the same).",
        choices=("attempts", "samples", "stages"),
    )
    pairs_file: str = opt(
        "pairs.jsonl", "Where the pairs go (JSON lines, cotune's pair layout; image paths relative to it)."
    )
    n: int = opt(4, "samples: replies sampled per record; stages: candidates per stage.", positive=True)
    chosen: str = opt(
        "sampled",
        "samples: the chosen reply is a right sample ('sampled', pairs only where samples disagree) or the "
        "record's own reply ('reference', against every wrong sample: a sample right by its conclusion "
        "may reason wrongly on the way).",
        choices=("sampled", "reference"),
    )
    per_record: int = opt(1, "At most this many pairs per record.", positive=True)
    first_records: int = opt(0, "Use the first N records only (0: all).")
    records_per_batch: int = opt(
        8, "samples: records sampled together in one generation batch.", positive=True
    )
