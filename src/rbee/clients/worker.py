"""A small typed client for one worker's HTTP API, for the queen, the CLI and tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from rbee.common.tokens import auth_headers
from rbee.contracts.errors import ErrorBody, read_error
from rbee.contracts.openai import ChatCompletion, ChatCompletionChunk, ModelList


class WorkerError(Exception):
    """The worker answered with an error; `status` and the OpenAI-style body are kept."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code


def _raise_for(response: httpx.Response) -> None:
    if not response.is_success:
        message, code = read_error(response.status_code, response.content)
        raise WorkerError(response.status_code, message, code)


class WorkerClient:
    """Wraps an `httpx.AsyncClient` the caller owns (pass a transport to test in-process)."""

    def __init__(self, base_url: str, client: httpx.AsyncClient, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._headers = auth_headers(token)

    async def health(self) -> dict[str, Any]:
        """The health body; 503 while loading is returned (not raised) — it is a state."""
        response = await self._client.get(f"{self.base_url}/health")
        if response.status_code not in (200, 503):
            _raise_for(response)
        body: dict[str, Any] = response.json()
        return body

    async def metrics(self, timeout_s: float = 2.0) -> str:
        """The worker's Prometheus figures, as text."""
        response = await self._client.get(
            f"{self.base_url}/metrics", headers=self._headers, timeout=timeout_s
        )
        _raise_for(response)
        return response.text

    async def models(self) -> ModelList:
        response = await self._client.get(f"{self.base_url}/v1/models", headers=self._headers)
        _raise_for(response)
        return ModelList.model_validate(response.json())

    async def chat(self, request: dict[str, Any]) -> ChatCompletion:
        response = await self._client.post(
            f"{self.base_url}/v1/chat/completions",
            json={**request, "stream": False},
            headers=self._headers,
        )
        _raise_for(response)
        return ChatCompletion.model_validate(response.json())

    async def chat_stream(self, request: dict[str, Any]) -> AsyncIterator[ChatCompletionChunk]:
        """The chunks of a streamed chat completion, until `[DONE]`."""
        async with self._client.stream(
            "POST",
            f"{self.base_url}/v1/chat/completions",
            json={**request, "stream": True},
            headers=self._headers,
        ) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                body = json.loads(data)
                if "error" in body:
                    detail = ErrorBody.model_validate(body).error
                    raise WorkerError(500, detail.message, detail.code)
                yield ChatCompletionChunk.model_validate(body)
