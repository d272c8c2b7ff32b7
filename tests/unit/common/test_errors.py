"""Errors as OpenAI clients read them: a 400 naming the field, and never a client's megabyte."""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from rbee.common.errors import install_error_handlers, quote


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None


def app() -> FastAPI:
    api = FastAPI()
    install_error_handlers(api)

    @api.post("/v1/chat/completions")
    async def chat(body: Body) -> dict[str, str]:
        return {"model": body.model}

    return api


def test_a_quote_is_cut_and_says_how_long_the_whole_was() -> None:
    assert quote("short") == "'short'"
    long = quote("y" * 5000)
    assert long.startswith("'" + "y" * 200 + "'…")
    assert "5,000 characters" in long
    assert len(long) < 260


async def test_a_body_that_fails_validation_is_a_400_naming_the_field() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/v1/chat/completions", json={"model": "m", "max_tokens": "x"})
        unknown = await http.post("/v1/chat/completions", json={"model": "m", "k" * 10**6: 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "max_tokens"
    assert unknown.status_code == 400
    assert len(unknown.content) < 5000, "an unknown field's megabyte name is not echoed back"


async def test_the_openai_sdk_reads_it_as_a_bad_request() -> None:
    """The SDK raises BadRequestError (not UnprocessableEntityError) with OpenAI's `param`."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app()))
    client = openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0
    )
    async with client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="m",
                messages=[],
                max_tokens="x",  # type: ignore[arg-type]
            )
    assert refused.value.param == "max_tokens"
