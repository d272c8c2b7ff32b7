"""The fast per-token chunk is byte for byte the chunk the contract model would produce."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee.contracts.openai import ChatCompletionChunk
from rbee.worker.responses import ChatAnswer, ChunkDelta, _event, _json


class _NoGeneration:
    outcome = None


@pytest.fixture(scope="module")
def answer() -> ChatAnswer:
    return ChatAnswer('model "with" quotes', _NoGeneration())  # type: ignore[arg-type]


@given(piece=st.text(max_size=20))
def test_fast_content_event_equals_the_model_dump(answer: ChatAnswer, piece: str) -> None:
    fast = answer.content_event()(piece)
    assert fast == _event(_json(answer._chunk(ChunkDelta(content=piece))))
    assert fast.startswith(b"data: ")
    assert fast.endswith(b"\n\n")
    parsed = ChatCompletionChunk.model_validate(json.loads(fast[6:]))
    assert parsed.choices[0].delta.content == piece
