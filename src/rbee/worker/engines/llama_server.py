"""The real engine: llama.cpp's own `llama-server`, run and supervised by the worker.

The worker starts one `llama-server` for its model (`LlamaServer`, the host) with one llama.cpp
slot per `--slots`, and talks to it over a Unix socket in a private directory, so nothing else
on the machine can reach it (and it takes no port). llama.cpp decodes all running requests in
one batch over one copy of the model: continuous batching, a request joins and leaves at any
token. Each worker slot holds a `LlamaServerEngine`, a handle with its own connection; the
worker keeps its own API in front: admission and 429, heartbeats, cancel on disconnect (closing
the connection stops the generation), graceful stop.

The server's process dies with the worker's (PR_SET_PDEATHSIG), and a server that dies on its
own stops the worker, whose supervisor (the hive, the queen's on-demand start) takes over. A
worker killed outright leaves its socket directory behind; the next worker on the machine
removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_sse import EventSource

from rbee.common.gpu import default_llama_server
from rbee.worker.engines.base import (
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
)

log = logging.getLogger("rbee.worker.llama_server")
_server_log = logging.getLogger("llama-server")

SERVER_BINARY = "llama-server"
DIR_PREFIX = "rbee-llama-server-"  # then the worker's pid and a random part
OUTPUT_LINES_KEPT = 60
READY_POLL_S = 0.02
STOP_GRACE_S = 5.0
BASE_URL = "http://llama-server"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


def default_binary() -> str:
    """The `llama-server` that ./dev installs next to the interpreter, else whatever PATH finds."""
    return default_llama_server()


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    ctx_size: int  # per slot
    slots: int
    threads: int
    passive_wait: bool = False
    embedding: bool = False
    kv_cache_type: str = "f16"
    pooled: bool = True  # the file names a pooling of its own (embedding models do)
    binary: str = SERVER_BINARY
    # llama.cpp's layers on the GPU: -1 all, 0 none. The worker is pinned to its one GPU
    # (CUDA_VISIBLE_DEVICES) before the server starts, so that GPU is the only one it sees.
    gpu_layers: int = 0

    def args(self, socket_path: Path) -> list[str]:
        args = [
            self.binary,
            *("--model", str(self.model), "--host", str(socket_path)),
            # Each slot its own stretch of the KV cache (llama.cpp's default for several slots):
            # a token attends to its own request's cells only, where one cache shared by all
            # slots makes every token attend across all of them, which costs more with each
            # request running. Each slot is held to exactly `ctx_size` (its stretch is rounded
            # up to a multiple of 256).
            *("--parallel", str(self.slots), "--no-kv-unified"),
            *("--kv-unified-per-slot", str(self.ctx_size)),
            *("--threads", str(self.threads), "--threads-batch", str(self.threads)),
            "--no-webui",
            *("--n-gpu-layers", "all" if self.gpu_layers < 0 else str(self.gpu_layers)),
            # Our heartbeats and /health say how the worker is; its own loading log is noise.
            *("--log-verbosity", "2"),
        ]
        if self.passive_wait:
            # Threads that share their cores with another worker must not spin while waiting.
            args += ["--poll", "0"]
        if self.kv_cache_type != "f16" and not self.embedding:
            # Every slot keeps its whole context in the cache, at half the bytes of f16: a
            # 4-slot worker costs little more than a 1-slot one, and no slot can run out of
            # room because others took it (a pool shared by the slots would fail them all
            # when it filled). A quantized V cache needs flash attention.
            args += ["--cache-type-k", self.kv_cache_type, "--cache-type-v", self.kv_cache_type]
            args += ["--flash-attn", "on"]
        if self.embedding:
            # One text is decoded in one batch (encoders need it whole), so a batch holds a
            # whole context.
            args += ["--embedding", "--batch-size", str(self.ctx_size)]
            args += ["--ubatch-size", str(self.ctx_size)]
            if not self.pooled:
                args += ["--pooling", "mean"]
        return args

    def env(self, api_key: str) -> dict[str, str]:
        env = {**os.environ, "LLAMA_API_KEY": api_key}  # in the environment, never in argv
        env.pop("RBEE_TOKEN", None)  # the cluster token is the worker's, not the engine's
        if self.passive_wait:
            # llama.cpp's OpenMP threads spin between operations by default: on cores shared
            # with another worker the spinning threads starve each other.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env


def _dies_with(parent: int) -> Callable[[], None]:
    """For the child before exec: be killed when the worker dies, however it dies.

    SIGKILL, not SIGTERM: a server with nobody left to answer has nothing to save, and its
    SIGTERM handler, called a second time while it shuts down, may hang in exit() (a server
    outlived its worker so in a test run). A worker that died before the child asked is
    checked for by pid, since the request only covers deaths after it."""

    def child() -> None:
        with contextlib.suppress(Exception):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return child


def sweep_stale_dirs(root: Path) -> list[Path]:
    """Remove (and return) the socket directories of this user's workers that are gone."""
    removed = []
    for path in root.glob(f"{DIR_PREFIX}*"):
        pid = path.name.removeprefix(DIR_PREFIX).split("-", 1)[0]
        with contextlib.suppress(OSError):
            mine = pid.isdigit() and path.stat().st_uid == os.getuid()
            if mine and not psutil.pid_exists(int(pid)):
                shutil.rmtree(path)
                removed.append(path)
    return removed


class LlamaServer:
    """The running `llama-server` process (the engines' host)."""

    def __init__(self, config: ServerConfig, *, load_timeout_s: float = 300.0) -> None:
        self.config = config
        self.load_timeout_s = load_timeout_s
        sweep_stale_dirs(Path(tempfile.gettempdir()))
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))  # mode 0700
        self.socket = self._dir / "server.sock"
        self.api_key = secrets.token_urlsafe(24)
        self._proc: asyncio.subprocess.Process | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.context_size = config.ctx_size
        self.vocab_size = 0
        self.embedding_size = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client(self, timeout: httpx.Timeout) -> httpx.AsyncClient:
        """A client for one engine (one connection, reused)."""
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
            base_url=BASE_URL,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=timeout,
        )

    async def start(self) -> None:
        binary = shutil.which(self.config.binary)
        if binary is None:
            raise EngineError(
                f"llama.cpp's server ({self.config.binary}) was not found; ./dev install builds it"
            )
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.config.args(self.socket),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.config.env(self.api_key),
                preexec_fn=_dies_with(os.getpid()) if sys.platform == "linux" else None,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {binary}: {exc.strerror or exc}") from None
        self._reader = asyncio.create_task(self._read_output(), name="llama-server-output")
        async with self.client(httpx.Timeout(5.0)) as http:
            try:
                async with asyncio.timeout(self.load_timeout_s):
                    await self._wait_ready(http)
            except TimeoutError:
                raise EngineError(
                    f"llama.cpp's server did not load {self.config.model} "
                    f"within {self.load_timeout_s:g}s"
                ) from None
            await self._read_facts(http)
        log.info(
            "llama-server (pid %d) serves %s: %d slot(s) of %d tokens, %d thread(s)%s",
            self._proc.pid,
            self.config.model.name,
            self.config.slots,
            self.context_size,
            self.config.threads,
            ", passive waiting" if self.config.passive_wait else "",
        )

    async def _read_output(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            _server_log.debug("%s", line)

    async def _wait_ready(self, http: httpx.AsyncClient) -> None:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health")).status_code == 200:
                    return
            if await self._exited(READY_POLL_S):
                raise EngineError(await self._load_failure())

    async def _exited(self, wait_s: float) -> bool:
        assert self._proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), wait_s)
        return self._proc.returncode is not None

    async def _last_words(self) -> str:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        return next((line for line in reversed(self._output) if line.strip()), "no output")

    async def _load_failure(self) -> str:
        assert self._proc is not None
        last = await self._last_words()
        output = "\n".join(self._output)
        log.debug("llama-server exited %s while loading:\n%s", self._proc.returncode, output)
        if "failed to load model" in output or "gguf" in output.lower():
            return (
                f"model file {self.config.model} cannot be loaded: "
                "corrupt or not a supported GGUF model"
            )
        return f"llama.cpp's server exited with code {self._proc.returncode} while loading: {last}"

    async def _read_facts(self, http: httpx.AsyncClient) -> None:
        """The context one slot really has, and the model's vocabulary and vector sizes."""
        try:
            props = (await http.get("/props")).json()
            self.context_size = int(props["default_generation_settings"]["n_ctx"])
            meta = (await http.get("/v1/models")).json()["data"][0]["meta"]
            self.vocab_size = int(meta["n_vocab"])
            self.embedding_size = int(meta["n_embd"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise EngineError(f"llama.cpp's server does not describe its model: {exc!r}") from None

    async def failure(self) -> str:
        assert self._proc is not None
        code = await self._proc.wait()
        last = await self._last_words()
        if self._closing:
            await asyncio.Future()  # an exit we asked for is no failure: never returns
        return f"llama.cpp's server exited with code {code}: {last}"

    async def close(self) -> None:
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class LlamaServerEngine:
    """One slot's handle onto the server: its own connection, one request at a time."""

    def __init__(self, server: LlamaServer) -> None:
        self._server = server
        # A long prompt may take a while before its first token; a dead server closes the
        # socket, which no read timeout is needed to notice.
        self._http = server.client(httpx.Timeout(None, connect=5.0))

    @property
    def context_size(self) -> int:
        return self._server.context_size

    @property
    def vocab_size(self) -> int:
        return self._server.vocab_size

    @property
    def embedding_size(self) -> int:
        return self._server.embedding_size

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"llama.cpp's server is not answering: {exc!r}") from None
        if response.status_code != 200:
            raise refusal(response.status_code, response.content)
        return response.json()

    async def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
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
        request = self._http.build_request("POST", "/completion", json=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineError(f"llama.cpp's server is not answering: {exc!r}") from None
        try:
            # llama.cpp answers a prompt it refuses (too long for a slot, a grammar it cannot
            # build) with an error status before it streams anything.
            if response.status_code != 200:
                await response.aread()
                raise schema_refusal(params, refusal(response.status_code, response.content))
            accepted()
            return await read_stream(response, params, emit, cancelled)
        except httpx.HTTPError as exc:
            raise EngineError(f"llama.cpp's server broke off the answer: {exc!r}") from None
        finally:
            await response.aclose()  # before the end: this is what stops llama.cpp generating

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
                    f"input {i} is {count} tokens long. Please shorten it.",
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
        await self._http.aclose()


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
    if params.seed is not None or params.logprobs is not None:
        # Reusing a cached prompt prefix decodes the rest in another batch shape, which moves
        # the logits by rounding: enough to change a sampled token or a score's last digits.
        # A seeded or scored request decodes its whole prompt afresh, so the same request
        # gives the same text and the same scores.
        body["cache_prompt"] = False
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


async def read_stream(
    response: httpx.Response,
    params: SamplingParams,
    emit: Emit,
    cancelled: asyncio.Event,
) -> Outcome:
    prompt_tokens, produced, finish = 0, 0, "length"
    async for event in EventSource(response).aiter_sse():
        if cancelled.is_set():
            return Outcome(prompt_tokens, produced, "stop", cancelled=True)
        data = json.loads(event.data)
        if "error" in data:
            raise EngineError(f"llama.cpp's server failed: {data['error'].get('message')}")
        scored: tuple[Scored, ...] = ()
        if params.logprobs is not None and (probs := data.get("completion_probabilities")):
            scored = tuple(scored_tokens(probs, params.logprobs))
        text = data.get("content") or ""
        if data.get("stop"):
            produced = int(data.get("tokens_predicted", produced))
            prompt_tokens = int(data.get("tokens_evaluated", prompt_tokens))
            finish = "length" if data.get("stop_type") == "limit" else "stop"
            if text or scored:
                emit(text, scored)
            break
        produced += 1
        if text or scored:
            emit(text, scored)
    return Outcome(prompt_tokens, produced, "length" if finish == "length" else "stop")


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
    """A refused request with a JSON schema: the schema is what it could not take."""
    if params.json_schema is not None and isinstance(error, PromptError):
        return PromptError(
            f"the JSON schema cannot be turned into a grammar: {error.message}",
            code="invalid_schema",
            param="response_format",
        )
    return error
