"""Logits processors for llama-cpp-python: log-probabilities of each step, and logit bias.

Both run inside llama.cpp's sampling chain on the raw logits of the next token, before
temperature, top-p and the grammar, so the scores are the model's own distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rbee.worker.engines.base import Candidate, Scored


class ScoreKeeper:
    """Keeps the log-softmax of the latest logits; `score` reads the chosen token's off it."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._logprobs: Any = None

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        shifted = scores - scores.max()
        self._logprobs = shifted - np.log(np.exp(shifted).sum())
        return scores

    def score(self, token: int, piece: bytes, token_bytes: Callable[[int], bytes]) -> Scored:
        logprobs = self._logprobs
        top: tuple[Candidate, ...] = ()
        if self.top:
            # argpartition finds the best N without sorting the whole vocabulary.
            best = np.argpartition(-logprobs, self.top)[: self.top]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(Candidate(token_bytes(int(t)), float(logprobs[t])) for t in best)
        return Scored(token=piece, logprob=float(logprobs[token]), top=top)


class LogitBias:
    def __init__(self, ids: Any, values: Any) -> None:
        self._ids = ids
        self._values = values

    @classmethod
    def of(cls, bias: Mapping[int, float]) -> LogitBias | None:
        if not bias:
            return None
        return cls(np.fromiter(bias.keys(), dtype=np.int64), np.fromiter(bias.values(), np.float32))

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        scores[self._ids] += self._values
        return scores
