"""Per-request sampling: greedy or temperature + top-p with the request's own generator, logprobs,
and stop strings that end a reply (and are cut from it) as OpenAI's API does."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """How one request picks its tokens.

    Attributes:
        max_tokens: longest reply.
        temperature: 0 is greedy (the token ``cotune generate`` picks).
        top_p: nucleus threshold (sampling only).
        seed: seeds the request's own ``torch.Generator`` (None: a random seed).
        stop: strings that end the reply; the reply is cut before the first one.
        logprobs: return each chosen token's log-probability.
        top_logprobs: and the most likely alternatives (0..20).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    extra: dict = field(default_factory=dict)

    def generator(self, choice: int, device: torch.device) -> torch.Generator | None:
        """The generator of choice ``choice`` (choice k of a seeded request uses seed + k)."""
        if self.temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed + choice)
        return g


def greedy(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token, the first on a tie as ``argmax`` (and ``model.generate``) picks it;
    ``max`` over the whole batch runs about 3x faster on the CPU than ``argmax`` row by row."""
    return logits.max(dim=-1).indices.tolist()


def pick(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None, best: int | None = None
) -> int:
    """The next token from one row's logits (float32, shape (vocab,)); ``best``: its greedy token."""
    if sampling.temperature == 0:
        return best if best is not None else int(torch.argmax(logits))
    scores = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)
        remove[-1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int, decode) -> dict:
    """OpenAI's logprobs entry for ``token``: its log-probability under the model and the ``top`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(t: int) -> dict:
        text = decode(t)
        return {"token": text, "logprob": float(logp[t]), "bytes": list(text.encode("utf-8"))}

    out = entry(token)
    values, ids = torch.topk(logp, top) if top else (None, torch.tensor([], dtype=torch.long))
    out["top_logprobs"] = [entry(int(t)) for t in ids]
    return out


class StopText:
    """A reply's text as its tokens come: what may be sent now, and whether a stop string ended it.

    Text that could still become a stop string (its tail matches a stop string's start) and an
    incomplete UTF-8 character are held back until the next token decides.
    """

    def __init__(self, decode, stops: tuple[str, ...]) -> None:
        self.decode, self.stops = decode, tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Adds a token; returns the text that can be sent now."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        safe = len(self.text) - (1 if self.text.endswith("\ufffd") else 0)
        hold = 0
        for s in self.stops:
            hold = max(
                [hold] + [k for k in range(1, min(len(s), safe + 1)) if self.text[:safe].endswith(s[:k])]
            )
        safe -= hold
        piece, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return piece

    def flush(self) -> str:
        """Everything not sent yet (at the end of the reply)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
