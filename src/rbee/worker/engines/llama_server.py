"""The real engine: llama.cpp's own `llama-server` (`llama_process`), behind rbee's worker.

llama.cpp decodes all running requests in one batch over one copy of the model: continuous
batching, a request joins and leaves at any token. Each worker slot holds a
`LlamaServerEngine`, a handle with its own connection to the server; the worker keeps its own
API in front: admission and 429, heartbeats, cancel on disconnect (closing the connection stops
the generation), graceful stop. This module turns rbee's requests into llama.cpp's and its
answers and refusals back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp

from rbee.worker.engines.base import (
    RAISE_CONTEXT,
    Candidate,
    Embeddings,
    Emit,
    EngineError,
    Message,
    Outcome,
    Prompt,
    PromptError,
    PromptTooLong,
    SamplingParams,
    Scored,
    as_json,
)
from rbee.worker.engines.llama_process import NETWORK_ERRORS, LlamaServer

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# A long prompt may take a while before its first token; a dead server closes the socket,
# which no read timeout is needed to notice.
GENERATION_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5.0)


class LlamaServerEngine:
    """One slot's handle onto the server: its own connection, one request at a time."""

    def __init__(self, server: LlamaServer) -> None:
        self._server = server
        self._http = server.client(GENERATION_TIMEOUT)

    @property
    def context_size(self) -> int:
        return self._server.context_size

    @property
    def vocab_size(self) -> int:
        return self._server.vocab_size

    @property
    def embedding_size(self) -> int:
        return self._server.embedding_size

    @property
    def native_tools(self) -> bool:
        """The model's chat template knows tools: llama.cpp formats and parses tool calls."""
        return self._server.native_tools

    async def relay(self, path: str, body: bytes) -> Relayed:
        """Send a request of one of llama.cpp's own APIs (`/v1/messages`, `/v1/responses`, ...)
        as it is; returns once its answer's head is in. On a connection of its own, so that
        a request that takes no slot (counting tokens) never waits behind a generation."""
        http = self._server.client(GENERATION_TIMEOUT)
        try:
            response = await http.post(
                path, data=body, headers={"Content-Type": "application/json"}
            )
        except NETWORK_ERRORS as exc:
            await http.close()
            raise EngineError(f"llama.cpp's server is not answering: {exc!r}") from None
        except BaseException:
            await http.close()
            raise
        return Relayed(http, response)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            async with self._http.post(path, json=body) as response:
                content = await response.read()
        except NETWORK_ERRORS as exc:
            raise EngineError(f"llama.cpp's server is not answering: {exc!r}") from None
        if response.status != 200:
            raise refusal(response.status, content)
        return json.loads(content)

    async def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        template = self._server.chat_template
        if template is not None:
            return Prompt(text=template.render(messages))
        body = {"messages": as_json(messages)}
        try:
            text = (await self._post("/apply-template", body))["prompt"]
        except PromptError as exc:
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from None
        return Prompt(text=str(text))

    async def prepare_text(self, text: str) -> Prompt:
        # The text is tokenized once, by llama.cpp as it generates: a round trip to count its
        # tokens first would add to every answer's first token. llama.cpp refuses a prompt
        # that leaves no room to generate, which `refusal` turns into PromptTooLong.
        if not text:
            raise PromptError("the prompt is empty", code="empty_prompt")
        return Prompt(text=text)

    def check(self, params: SamplingParams) -> None:
        vocab = self.vocab_size
        for token in params.logit_bias:
            if not 0 <= token < vocab:
                raise PromptError(
                    f"logit_bias names token {token}, but this model's tokens are 0-{vocab - 1}",
                    code="invalid_logit_bias",
                    param="logit_bias",
                )

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Emit,
        cancelled: asyncio.Event,
        accepted: Callable[[], None],
    ) -> Outcome:
        body = completion_body(prompt, params)
        try:
            response = await self._http.post("/completion", json=body)
        except NETWORK_ERRORS as exc:
            raise EngineError(f"llama.cpp's server is not answering: {exc!r}") from None
        try:
            # llama.cpp answers a prompt it refuses (too long for a slot, a grammar it cannot
            # build) with an error status before it streams anything.
            if response.status != 200:
                raise schema_refusal(params, refusal(response.status, await response.read()))
            accepted()
            return await read_stream(response.content, params, emit, cancelled)
        except NETWORK_ERRORS as exc:
            raise EngineError(f"llama.cpp's server broke off the answer: {exc!r}") from None
        finally:
            response.close()  # before the end: this is what stops llama.cpp generating

    async def _count_tokens(self, text: str) -> int:
        answer = await self._post("/tokenize", {"content": text, "add_special": True})
        return len(answer["tokens"])

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        if not self._server.config.embedding:
            raise PromptError(
                "this worker was not started for embeddings (llm-worker-rbee --embedding)",
                code="not_an_embedding_worker",
                param="model",
            )
        for i, text in enumerate(texts):
            if not text:
                raise PromptError("the input is empty", code="empty_input", param=f"input[{i}]")
            count = await self._count_tokens(text)
            if count > self.context_size:
                raise PromptError(
                    f"This model's maximum context length is {self.context_size} tokens, but "
                    f"input {i} is {count} tokens long. Please shorten it. {RAISE_CONTEXT}",
                    code="context_length_exceeded",
                    param=f"input[{i}]",
                )
        vectors: list[list[float]] = []
        tokens = 0
        for text in texts:
            # One text per request: batched with others, the same text comes out different in
            # the last digits (another batch shape, another rounding), and a client comparing
            # vectors expects the same text to give the same vector.
            answer = await self._post("/v1/embeddings", {"input": text, "encoding_format": "float"})
            vectors.append([float(x) for x in answer["data"][0]["embedding"]])
            tokens += int(answer.get("usage", {}).get("prompt_tokens", 0))
        return Embeddings(vectors=vectors, prompt_tokens=tokens)

    async def close(self) -> None:
        await self._http.close()


class Relayed:
    """llama.cpp's answer to a relayed request: its status and type, then its body, whole or
    event by event. `close` before the end is what stops llama.cpp generating."""

    def __init__(self, http: aiohttp.ClientSession, response: aiohttp.ClientResponse) -> None:
        self._http = http
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except NETWORK_ERRORS as exc:
            raise EngineError(f"llama.cpp's server broke off the answer: {exc!r}") from None

    async def events(self) -> AsyncIterator[bytes]:
        """The body as server-sent events, each with its blank line, as they arrive."""
        pending = b""
        try:
            async for chunk in self._response.content.iter_any():
                pending += chunk
                while (end := pending.find(b"\n\n")) >= 0:
                    yield pending[: end + 2]
                    pending = pending[end + 2 :]
        except NETWORK_ERRORS as exc:
            raise EngineError(f"llama.cpp's server broke off the answer: {exc!r}") from None
        if pending.strip():
            yield pending

    async def close(self) -> None:
        self._response.close()
        await self._http.close()


def completion_body(prompt: Prompt, params: SamplingParams) -> dict[str, Any]:
    """llama.cpp's own /completion request. Without `max_tokens` an answer may run to the end of
    its slot's context, where llama.cpp stops it as it would at the limit."""
    body: dict[str, Any] = {
        "prompt": prompt.text,
        "n_predict": -1 if params.max_tokens is None else params.max_tokens,
        "stream": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": [*params.stop, *prompt.stop],
        "return_tokens": False,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    # Reusing a cached prompt prefix decodes the rest in another batch shape, which moves
    # the logits by rounding: enough to change a sampled token or a score's last digits.
    # A seeded or scored request decodes its whole prompt afresh, so the same request
    # gives the same text and the same scores. Every other request reuses the longest prefix
    # a slot (or llama.cpp's prompt cache) holds: the queen's prefix routing sends a
    # conversation's next turn to the worker that holds its earlier turns for this.
    body["cache_prompt"] = params.seed is None and params.logprobs is None
    if params.json_schema is not None:
        body["json_schema"] = params.json_schema
    if params.logit_bias:
        body["logit_bias"] = [[token, bias] for token, bias in params.logit_bias.items()]
    if params.logprobs is not None:
        # Always as many alternatives as OpenAI allows, cut to what was asked afterwards: how
        # many llama.cpp is asked for moves the scores' last digits, and the same question
        # should get the same scores however many alternatives it wants.
        body["n_probs"] = MAX_TOP_LOGPROBS
    return body


def scored_tokens(probabilities: Sequence[dict[str, Any]], top: int) -> list[Scored]:
    return [
        Scored(
            token=bytes(p.get("bytes") or p.get("token", "").encode()),
            logprob=float(p["logprob"]),
            top=tuple(
                Candidate(bytes(c.get("bytes") or c.get("token", "").encode()), float(c["logprob"]))
                for c in p.get("top_logprobs", [])[:top]
            ),
        )
        for p in probabilities
    ]


def stream_event(line: bytes) -> dict[str, Any] | None:
    """One line of llama.cpp's event stream: `data: {...}` per token (`{"error": ...}` if it
    fails after it began); blank lines and comments (its pings) carry nothing."""
    if not line.startswith(b"data: "):
        return None
    event: dict[str, Any] = json.loads(line[6:])
    return event


async def read_stream(
    lines: AsyncIterable[bytes],
    params: SamplingParams,
    emit: Emit,
    cancelled: asyncio.Event,
) -> Outcome:
    """Hand on llama.cpp's streamed answer piece by piece, up to its last event."""
    prompt_tokens, produced, finish, cached = 0, 0, "length", 0
    async for line in lines:
        if cancelled.is_set():
            return Outcome(prompt_tokens, produced, "stop", cancelled=True)
        data = stream_event(line)
        if data is None:
            continue
        if "error" in data:
            raise EngineError(f"llama.cpp's server failed: {data['error'].get('message')}")
        scored: tuple[Scored, ...] = ()
        if params.logprobs is not None and (probs := data.get("completion_probabilities")):
            scored = tuple(scored_tokens(probs, params.logprobs))
        text = data.get("content") or ""
        if data.get("stop"):
            produced = int(data.get("tokens_predicted", produced))
            prompt_tokens = int(data.get("tokens_evaluated", prompt_tokens))
            cached = int((data.get("timings") or {}).get("cache_n", 0))
            finish = "length" if data.get("stop_type") == "limit" else "stop"
            if text or scored:
                emit(text, scored)
            break
        produced += 1
        if text or scored:
            emit(text, scored)
    return Outcome(
        prompt_tokens, produced, "length" if finish == "length" else "stop", cached_tokens=cached
    )


def refusal(status: int, content: bytes) -> Exception:
    """The error for a request llama-server refused, from its JSON error body."""
    try:
        error = json.loads(content)["error"]
        message = str(error.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        error, message = {}, content.decode(errors="replace")[:200]
    if error.get("type") == "exceed_context_size_error":
        return PromptTooLong(int(error.get("n_prompt_tokens", 0)), int(error.get("n_ctx", 0)))
    if 400 <= status < 500:
        return PromptError(message or f"the model refused the request (HTTP {status})")
    return EngineError(f"llama.cpp's server failed: HTTP {status} {message}".rstrip())


def schema_refusal(params: SamplingParams, error: Exception) -> Exception:
    """A refused request with a JSON schema: the schema is what it could not take, unless the
    prompt is too long for the context, whatever the schema."""
    if (
        params.json_schema is not None
        and isinstance(error, PromptError)
        and not isinstance(error, PromptTooLong)
    ):
        return PromptError(
            f"the JSON schema cannot be turned into a grammar: {error.message}",
            code="invalid_schema",
            param="response_format",
        )
    return error
