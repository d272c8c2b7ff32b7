"""What each worker's KV cache most likely holds: the conversation prefixes it was recently sent.

A request's prefix key is its rendered conversation (tools, system, messages, prompt: each
field serialized canonically, in a fixed order, so that a conversation's next turn renders to
a text that starts with this turn's) cut into blocks of `BLOCK_CHARS` characters, each block's
hash chained over the blocks before it: block k's hash stands for blocks 0..k, so one lookup
per block tells how far a worker's prefix reaches. The queen does not tokenize: characters of
the same rendering line up with the tokens llama.cpp caches closely enough to route by.

Memory is bounded: the index holds at most `capacity` block hashes, and forgets the least
recently sent first; sessions likewise. A worker that goes away is forgotten at once.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rbee.queen.routing.policies import Candidate, Decision, prefix_affinity

BLOCK_CHARS = 256  # about 64 tokens of English
MAX_PREFIX_CHARS = 64 * 1024  # the leading characters hashed: 256 blocks (about 16k tokens)
DEFAULT_CAPACITY = 65_536  # block hashes remembered (about 170 bytes each: 11 MB)
DEFAULT_SESSIONS = 10_000  # sessions remembered
MAX_HOLDERS = 8  # workers remembered per block: more replicas than this share it anyway
MAX_SESSION_CHARS = 256
# A request's fields that make up its prompt, in the order they are rendered in: what comes
# before the conversation (tools, system prompt), then the conversation. OpenAI chat and
# completions, and the Anthropic, Responses and Ollama shapes.
PROMPT_FIELDS = ("tools", "functions", "system", "instructions", "messages", "input", "prompt")
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What the router needs to know of a request to send it where its prefix is cached."""

    blocks: tuple[int, ...]  # chained hashes of the rendered prompt's blocks
    session: str | None = None


def render(payload: Mapping[str, Any]) -> str:
    """The prompt-shaping fields of a request, canonically: same request, same text; a
    conversation's next turn, the same text with more at the end (the closing `]` aside)."""
    parts = []
    for name in PROMPT_FIELDS:
        value = payload.get(name)
        if value is not None:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            parts.append(f"{name}={text}")
    return "\n".join(parts)


def chained_blocks(text: str) -> tuple[int, ...]:
    """The hashes of the text's leading blocks (the last one may be short), each covering the
    blocks before it."""
    text = text[:MAX_PREFIX_CHARS]
    blocks: list[int] = []
    previous = 0
    for start in range(0, len(text), BLOCK_CHARS):
        previous = hash((previous, text[start : start + BLOCK_CHARS]))
        blocks.append(previous)
    return tuple(blocks)


def session_of(payload: Mapping[str, Any], header: str | None) -> str | None:
    """The request's session: the `x-session-id` header, else OpenAI's `user` field."""
    session = header if header else payload.get("user")
    if isinstance(session, str) and session:
        return session[:MAX_SESSION_CHARS]
    return None


def route_key(payload: Mapping[str, Any], session_header: str | None = None) -> RouteKey:
    return RouteKey(chained_blocks(render(payload)), session_of(payload, session_header))


class PrefixIndex:
    """Block hash -> the workers recently sent the prefix it stands for, least recent first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._holders: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def remember(self, worker_id: str, blocks: Sequence[int]) -> None:
        """The worker was sent this prefix. Deepest block first, so that a prefix's shorter
        parts are always more recent than its longer ones and are forgotten after them."""
        worker_id = sys.intern(worker_id)
        holders = self._holders
        for block in reversed(blocks):
            known = holders.pop(block, ())
            if worker_id in known:
                known = tuple(w for w in known if w != worker_id)
            holders[block] = (*known[-(MAX_HOLDERS - 1) :], worker_id)
        while len(holders) > self.capacity:
            holders.popitem(last=False)

    def held(self, blocks: Sequence[int], workers: Collection[str]) -> dict[str, int]:
        """For each of `workers` that holds part of the prefix, how many leading blocks."""
        found: dict[str, int] = {}
        for depth, block in enumerate(blocks, 1):
            holders = self._holders.get(block)
            if holders is None:
                break
            for worker_id in holders:
                if worker_id in workers:
                    found[worker_id] = depth
        return found

    def drop(self, worker_id: str) -> None:
        """The worker went away: its cache with it."""
        holders = self._holders
        for block, known in list(holders.items()):
            if worker_id in known:
                rest = tuple(w for w in known if w != worker_id)
                if rest:
                    holders[block] = rest
                else:
                    del holders[block]

    def workers(self) -> set[str]:
        return {w for known in self._holders.values() for w in known}


class Sessions:
    """Session -> the worker it was last sent to, the least recently used forgotten first."""

    def __init__(self, capacity: int = DEFAULT_SESSIONS) -> None:
        self.capacity = capacity
        self._workers: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, session: str) -> str | None:
        return self._workers.get(session)

    def bind(self, session: str, worker_id: str) -> None:
        self._workers.pop(session, None)
        self._workers[session] = sys.intern(worker_id)
        while len(self._workers) > self.capacity:
            self._workers.popitem(last=False)

    def drop(self, worker_id: str) -> None:
        for session in [s for s, w in self._workers.items() if w == worker_id]:
            del self._workers[session]


class Affinity:
    """The prefix policy's memory: the prefix index and the sessions, around the pure policy."""

    def __init__(
        self,
        margin: float,
        capacity: int = DEFAULT_CAPACITY,
        sessions: int = DEFAULT_SESSIONS,
    ) -> None:
        self.margin = margin
        self.index = PrefixIndex(capacity)
        self.sessions = Sessions(sessions)

    def choose(self, candidates: Sequence[Candidate], turn: int, key: RouteKey) -> Decision:
        """Pick a worker for the request and remember that it was sent this prefix."""
        ids = {c.worker_id for c in candidates}
        held = self.index.held(key.blocks, ids) if key.blocks else {}
        session = self.sessions.get(key.session) if key.session is not None else None
        decision = prefix_affinity(candidates, turn, held, session, self.margin)
        worker_id = decision.choice.worker_id
        self.index.remember(worker_id, key.blocks)
        if key.session is not None:
            self.sessions.bind(key.session, worker_id)
        return decision

    def drop(self, worker_id: str) -> None:
        self.index.drop(worker_id)
        self.sessions.drop(worker_id)
