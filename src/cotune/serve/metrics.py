"""The server's counters, gauges and latency histogram, written in Prometheus' text format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

COUNTERS = {
    "requests_total": "Chat completion requests received.",
    "requests_finished": "Requests answered in full.",
    "requests_rejected": "Requests refused with a 4xx or 503 before they ran.",
    "requests_cancelled": "Requests whose client went away before the reply ended.",
    "prompt_tokens": "Prompt tokens prefilled.",
    "generation_tokens": "Tokens generated.",
    "decode_steps": "Batched decoding steps (one forward each).",
}


class Metrics:
    """Counts updated by the engine and the HTTP layer; ``render`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.queue_depth = 0
        self.batch_size = 0
        self.peak_batch_size = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counts[name] += value
            self.peak_batch_size = max(self.peak_batch_size, self.batch_size)

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def render(self, adapters: int = 0) -> str:
        lines = []
        with self.lock:
            for name, help_text in COUNTERS.items():
                metric = f"cotune_{name}" if name.endswith("_total") else f"cotune_{name}_total"
                lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
                lines.append(f"{metric} {self.counts[name]:g}")
            gauges = {
                "queue_depth": (self.queue_depth, "Requests waiting to join the batch."),
                "batch_size": (self.batch_size, "Rows in the running batch."),
                "peak_batch_size": (self.peak_batch_size, "Most rows decoded together so far."),
                "adapters_loaded": (adapters, "Adapters loaded on the base model."),
            }
            for name, (value, help_text) in gauges.items():
                lines += [f"# HELP cotune_{name} {help_text}", f"# TYPE cotune_{name} gauge"]
                lines.append(f"cotune_{name} {value:g}")
            metric = "cotune_request_latency_seconds"
            lines += [f"# HELP {metric} Time from arrival to the last token.", f"# TYPE {metric} histogram"]
            total = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts):
                total += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{metric}_bucket{{le="{le}"}} {total}')
            lines += [f"{metric}_sum {self.latency_sum:.6f}", f"{metric}_count {total}"]
        return "\n".join(lines) + "\n"
