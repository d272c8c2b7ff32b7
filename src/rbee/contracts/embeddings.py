"""`POST /v1/embeddings` as OpenAI defines it: vectors for one text or a list of texts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[StrictStr, Field(min_length=1)]
    # Texts; OpenAI also takes token ids, which only mean something for its own tokenizer:
    # those are refused with 400 by the worker, naming `input`.
    input: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS)]
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[list[StrictInt]], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    # The openai SDK asks for base64 unless told otherwise: little-endian float32 bytes.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
