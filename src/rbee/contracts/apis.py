"""The APIs a model is served on, as `GET /v1/models` lists them in its `rbee.apis`."""

from __future__ import annotations

# A model's chat workers answer these (the queen and the worker, each at its own path):
# /v1/chat/completions, /v1/completions, /v1/messages (+ /count_tokens), /v1/responses
# (+ /input_tokens).
CHAT_APIS = ("chat.completions", "completions", "messages", "responses")
# Its workers started for embeddings answer /v1/embeddings.
EMBEDDING_APIS = ("embeddings",)
# Its workers started for reranking (a reranker model) answer /v1/rerank (and /v1/reranking).
RERANK_APIS = ("rerank",)


def served_apis(*, chat: bool, embedding: bool, rerank: bool = False) -> list[str]:
    """The APIs of a model with chat workers, embedding workers and/or reranking workers."""
    return [
        *(CHAT_APIS if chat else ()),
        *(EMBEDDING_APIS if embedding else ()),
        *(RERANK_APIS if rerank else ()),
    ]
