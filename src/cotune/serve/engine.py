"""The scheduler: continuous batching of requests across adapters, one forward per decoding step.

One thread owns the model. Each turn of its loop it runs the calls handed to it (adapter loading,
a stage search), admits waiting requests, and decodes one token for every running row in one
forward. The rows live in one ``BatchCache`` (``cotune.infer.cache``): a request is prefilled alone
into a free slot (its images' keys and values computed once and shared by its ``n`` choices, which
are forks of that slot), without touching the other rows' caches; a row that ends gives its slot
back. A PEFT model gets the rows' adapters as ``adapter_names`` (``"__base__"`` for the base
model), so one batch mixes adapters. Each row samples with its request's settings and generator. A
row leaves the batch when it ends, when its request's client goes away, or when its request runs
past its time limit.

Example:
    >>> engine = Engine(model, processor, family)
    >>> engine.start()
    >>> engine.submit(Job(item, "med", Sampling(max_tokens=64, temperature=0), emit=events.append))
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.data.batching import to_device
from cotune.infer.adapters import adapter_names, use_adapter
from cotune.infer.cache import BatchCache, forward
from cotune.infer.generate import model_device_dtype
from cotune.models.families import ModelFamily
from cotune.serve.metrics import Metrics
from cotune.serve.sampling import Sampling, StopText, greedy, pick, token_logprobs

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _timeout(job) -> dict:
    message = f"the request ran past its time limit of {job.timeout_s:g} s (--request_timeout)"
    return {"type": "error", "status": 504, "message": message, "code": "timeout"}


class QueueFull(Exception):
    """The waiting queue is at its limit (the HTTP layer answers 503 with Retry-After)."""


@dataclass
class Job:
    """One request: an encoded prompt (``encode_prompt``'s item), its adapter and sampling, and
    ``emit``, called from the engine's thread with each event (a dict with ``type`` delta, finish,
    done or error)."""

    item: dict
    adapter: str
    sampling: Sampling
    emit: Callable[[dict], None]
    n: int = 1
    timeout_s: float = 600.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    finished: int = 0
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.item["input_ids"])

    def expired(self) -> bool:
        return time.monotonic() - self.created > self.timeout_s


@dataclass
class Choice:
    """One running row: choice ``index`` of ``job``, in cache slot ``slot``; ``tail``: the
    cross-attention mask row its generated tokens repeat (None without images)."""

    job: Job
    index: int
    text: StopText
    generator: torch.Generator | None
    slot: int = -1
    tail: torch.Tensor | None = None
    last: int = -1
    count: int = 0
    done: bool = False


class Engine:
    """Runs every request through one model in batches; see the module docstring.

    Args:
        model: a base model or a PEFT model with the adapters loaded.
        processor, family: the checkpoint's processor and family.
        max_batch: most rows decoded together.
        max_queue: most requests waiting; ``submit`` raises ``QueueFull`` beyond it.
        metrics: where counts go.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        family: ModelFamily,
        max_batch: int = 32,
        max_queue: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.device, self.dtype = model_device_dtype(model)
        self.eos = set(family.end_of_turn_ids(processor.tokenizer))
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        self.config = config
        self.cache = BatchCache(config, self.device, self.dtype, slots=max_batch)
        self.image_token_id = family.image_token_id(processor.tokenizer)
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.choices: list[Choice] = []
        self.wake = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the outside
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="cotune-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.wake:
            self.running = False
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues ``job``; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit, --max_queue)")
            self.waiting.append(job)
            self.metrics.queue_depth = len(self.waiting)
            self.wake.notify_all()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs ``fn()`` on the engine's thread between two steps (it owns the model); its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.calls.append((fn, future))
            self.wake.notify_all()
        return future

    def adapters_in_use(self) -> set[str]:
        with self.wake:
            return {c.job.adapter for c in self.choices} | {j.adapter for j in self.waiting}

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not (self.waiting or self.calls or self.choices):
                    self.wake.wait(timeout=1.0)
                if not self.running:
                    break
                calls, self.calls = list(self.calls), deque()
            for fn, future in calls:
                self._run_call(fn, future)
            try:
                self._admit()
                if self.choices:
                    self._step()
            except Exception as e:  # a failed forward fails its rows, never the server
                self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"), status=503)

    def _run_call(self, fn, future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    def _admit(self) -> None:
        while True:
            with self.wake:
                if not self.waiting or len(self.choices) + self.waiting[0].n > self.max_batch:
                    self.metrics.queue_depth = len(self.waiting)
                    return
                job = self.waiting.popleft()
                self.metrics.queue_depth = len(self.waiting)
            if job.cancelled.is_set():
                continue
            if job.expired():
                self._emit(job, _timeout(job))
                continue
            slot = self.cache.add()
            try:
                logits, tail = self._prefill(job, slot)
            except Exception as e:
                self.cache.free([slot])
                self._emit(job, {"type": "error", "status": 500, "message": f"prefill failed: {e}"})
                continue
            self.metrics.add("prompt_tokens", job.prompt_tokens)
            slots = [slot, *self.cache.fork(slot, job.n - 1)]  # the choices share the image
            choices = [self._new_choice(job, k, s, tail) for k, s in enumerate(slots)]
            best = greedy(logits)[0]
            for choice in choices:
                self._accept(choice, logits[0], best)
            self.choices += choices
            self._drop_finished()

    def _new_choice(self, job: Job, k: int, slot: int, tail: torch.Tensor | None) -> Choice:
        tokenizer = self.processor.tokenizer

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

        generator = job.sampling.generator(k, self.device)
        return Choice(job, k, StopText(decode, job.sampling.stop), generator, slot, tail)

    @torch.no_grad()
    def _prefill(self, job: Job, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``job``'s prompt alone through the model into ``slot``: the next token's logits and the
        cross-attention mask row its generated tokens repeat."""
        ids = job.item["input_ids"]
        piece = {"input_ids": ids.to(self.device)}
        images = None
        if job.item.get("pixel_values") is not None:
            batch = self.family.collate_images([job.item], len(ids), self.image_token_id)
            batch = to_device(batch, self.device, float_dtype=self.dtype)
            piece["cross_attention_mask"] = batch.pop("cross_attention_mask")[0]
            images = batch
        # One request: its adapter active, as ``cotune generate`` runs it. (PEFT's per-row adapter_names
        # cannot reach the image states' projections, whose batch is images x tiles, not rows.)
        with use_adapter(self.model, job.adapter if adapter_names(self.model) else "none"):
            logits = forward(self.model, self.cache, {slot: piece}, images, image_tag=job.adapter)
        tail = piece["cross_attention_mask"][-1:] if images is not None else None
        return logits, tail

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every running row, in one forward."""
        self._drop_expired()
        if not self.choices:
            return
        pieces = {}
        for c in self.choices:
            pieces[c.slot] = {"input_ids": torch.tensor([c.last], device=self.device)}
            if c.tail is not None:
                pieces[c.slot]["cross_attention_mask"] = c.tail
        adapters = None
        if adapter_names(self.model):
            adapters = {c.slot: c.job.adapter if c.job.adapter != "none" else BASE for c in self.choices}
        self.metrics.batch_size = len(self.choices)
        self.metrics.add("decode_steps", 1)
        logits = forward(self.model, self.cache, pieces, adapter_names=adapters, idle_adapter=BASE)
        for choice, row_logits, best in zip(self.choices, logits, greedy(logits)):
            self._accept(choice, row_logits, best)
        self._drop_finished()

    def _accept(self, choice: Choice, logits: torch.Tensor, best: int) -> None:
        """Picks the row's next token (``best``: its greedy one) and tells its client; ends the row
        where the reply ends."""
        sampling = choice.job.sampling
        token = pick(logits, sampling, choice.generator, best)
        if token in self.eos:
            return self._finish(choice, "stop")
        choice.last, choice.count = token, choice.count + 1
        choice.job.completion_tokens += 1
        self.metrics.add("generation_tokens", 1)
        piece = choice.text.add(token)
        event = {"type": "delta", "index": choice.index, "text": piece}
        if sampling.logprobs:
            tokenizer = self.processor.tokenizer

            def decode(t):
                return tokenizer.decode([t])

            event["logprobs"] = token_logprobs(logits, token, sampling.top_logprobs, decode)
        self._emit(choice.job, event)
        if choice.text.stopped:
            self._finish(choice, "stop")
        elif choice.count >= sampling.max_tokens:
            self._finish(choice, "length")

    def _finish(self, choice: Choice, reason: str) -> None:
        choice.done = True
        piece = choice.text.flush()
        if piece:
            self._emit(choice.job, {"type": "delta", "index": choice.index, "text": piece})
        self._emit(choice.job, {"type": "finish", "index": choice.index, "reason": reason})
        job = choice.job
        job.finished += 1
        if job.finished == job.n:
            usage = {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": job.completion_tokens,
                "total_tokens": job.prompt_tokens + job.completion_tokens,
            }
            self.metrics.observe_latency(time.monotonic() - job.created)
            self.metrics.add("requests_finished", 1)
            self._emit(job, {"type": "done", "usage": usage})

    def _drop_expired(self) -> None:
        for choice in self.choices:
            job = choice.job
            if choice.done:
                continue
            if job.cancelled.is_set():
                choice.done = True
                self.metrics.add("requests_cancelled", 1)
            elif job.expired():
                choice.done = True
                self._emit(job, _timeout(job))
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, c in enumerate(self.choices) if not c.done]
        if len(keep) == len(self.choices):
            return
        self.cache.free([c.slot for c in self.choices if c.done])
        self.choices = [self.choices[i] for i in keep]
        self.metrics.batch_size = len(self.choices)
        self._compact()

    def _compact(self) -> None:
        """Keeps the running rows in the lowest slots: a step runs every slot between the lowest and
        the highest running one, so the highest row moves into each free slot below it (one row's
        keys and values copied, the others untouched)."""
        while self.choices:
            top = max(self.choices, key=lambda c: c.slot)
            hole = next((s for s in range(top.slot) if not self.cache.used[s]), None)
            if hole is None:
                return
            self.cache.move(top.slot, hole)
            top.slot = hole

    def _emit(self, job: Job, event: dict) -> None:
        try:
            job.emit(event)
        except Exception:  # a client that went away; its rows are dropped at the next step
            job.cancelled.set()

    def _fail_all(self, error: BaseException, status: int = 500) -> None:
        with self.wake:
            jobs = {id(c.job): c.job for c in self.choices} | {id(j): j for j in self.waiting}
            self.waiting.clear()
        self.cache.free([c.slot for c in self.choices])
        self.choices = []
        for job in jobs.values():
            self._emit(
                job, {"type": "error", "status": status, "message": f"{type(error).__name__}: {error}"}
            )
        self.metrics.batch_size = 0
