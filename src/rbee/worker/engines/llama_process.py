"""llama.cpp's own `llama-server` as a process the worker runs and supervises.

The worker starts one `llama-server` for its model (`LlamaServer`) with one llama.cpp slot per
`--slots`, on a Unix socket in a private directory, so nothing else on the machine can reach it
(and it takes no port). The server's process dies with the worker's (PR_SET_PDEATHSIG), and a
server that dies on its own stops the worker, whose supervisor (the hive, the queen's
on-demand start) takes over. A worker killed outright leaves its socket directory behind; the
next worker on the machine removes it. What the worker asks of it is `llama_server`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from rbee.common.children import Child, spawn
from rbee.common.gpu import default_llama_server
from rbee.common.lines import read_lines
from rbee.worker.engines.base import EngineError, as_json
from rbee.worker.engines.chat_template import PROBES, ChatTemplate, agrees_with, compile_template

log = logging.getLogger("rbee.worker.llama_server")
_server_log = logging.getLogger("llama-server")

SERVER_BINARY = "llama-server"
DIR_PREFIX = "rbee-llama-server-"  # then the worker's pid and a random part
OUTPUT_LINES_KEPT = 60
READY_POLL_S = 0.02  # how often /health is asked while the server has not logged LOADED_LINE
LOADED_LINE = "model loaded"  # how llama-server's log line ends once /health answers 200
FIRST = asyncio.FIRST_COMPLETED
STOP_GRACE_S = 5.0
PROBE_INTERVAL_S = 5.0  # how often the worker checks that the server still answers
LEARN_AFTER_S = 0.5  # how long after it serves the chat template is probed
BASE_URL = "http://llama-server"
# What a server that died, hung or closed its socket raises, from connecting to reading.
NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


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
    # Reranking (`--reranking`: embeddings pooled by rank, and llama.cpp's /v1/rerank).
    rerank: bool = False
    kv_cache_type: str = "f16"
    # Its copies, in RAM, of prompts it served that no slot holds any more (--cache-ram), in
    # MiB; 0: none. llama-server's own default is 8 GiB: past any memory budget.
    prompt_cache_mib: int = 0
    pooled: bool = True  # the file names a pooling of its own (embedding models do)
    binary: str = SERVER_BINARY
    # llama.cpp's layers on the GPU: -1 all, 0 none. The worker is pinned to its one GPU
    # (CUDA_VISIBLE_DEVICES) before the server starts, so that GPU is the only one it sees.
    gpu_layers: int = 0
    # More of llama-server's flags (a split worker's `--rpc` and `--tensor-split`).
    extra_args: tuple[str, ...] = ()

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
            # Chats go through the model's own Jinja chat template, which is what lets llama.cpp
            # format and parse tool calls the way the model was trained to (where the template
            # knows tools) on /v1/chat/completions, /v1/messages and /v1/responses.
            "--jinja",
            *("--n-gpu-layers", "all" if self.gpu_layers < 0 else str(self.gpu_layers)),
            # Its log at info level: ~10 lines a load and 7 a request (nothing for /health or
            # /slots), and the line that says its model is loaded (LOADED_LINE), which tells
            # the worker at once rather than at its next look.
            *("--log-verbosity", "3"),
            # An embedding worker's texts never come back: it keeps none.
            *("--cache-ram", "0" if self.embedding else str(self.prompt_cache_mib)),
        ]
        args += self.extra_args
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
        if self.rerank:
            # llama.cpp serves /v1/rerank only when told so, even for a file that pools by rank.
            args += ["--reranking"]
        return args

    def env(self, api_key: str) -> dict[str, str]:
        env = {**os.environ, "LLAMA_API_KEY": api_key}  # in the environment, never in argv
        env.pop("RBEE_TOKEN", None)  # the cluster token is the worker's, not the engine's
        if self.passive_wait:
            # llama.cpp's OpenMP threads spin between operations by default: on cores shared
            # with another worker the spinning threads starve each other.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env


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

    def __init__(
        self,
        config: ServerConfig,
        *,
        load_timeout_s: float = 300.0,
        stall_timeout_s: float = 180.0,
    ) -> None:
        """`stall_timeout_s`: the longest the server may take to answer between two batches
        (one batch of a long prompt on a slow CPU takes minutes) before it counts as hung."""
        self.config = config
        self.load_timeout_s = load_timeout_s
        self.stall_timeout_s = stall_timeout_s
        sweep_stale_dirs(Path(tempfile.gettempdir()))
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))  # mode 0700
        self.socket = self._dir / "server.sock"
        self.api_key = secrets.token_urlsafe(24)
        self._proc: Child | None = None
        self._launch_error: EngineError | None = None
        self._said_loaded = asyncio.Event()  # its log said the model is loaded
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.context_size = config.ctx_size
        self.vocab_size = 0
        self.embedding_size = 0
        # The model's chat template when the worker renders it as llama.cpp does, else None.
        self.chat_template: ChatTemplate | None = None
        # The chat template knows tools (llama.cpp's `chat_template_caps.supports_tools`): tool
        # calls then go through it, in the model's own format, parsed back by llama.cpp.
        self.native_tools = False
        self._learning: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client(self, timeout: aiohttp.ClientTimeout, connections: int = 1) -> aiohttp.ClientSession:
        """A client for one engine. Made inside the running event loop, as aiohttp requires.

        A new connection per request: llama-server may close a connection once it has answered,
        and a request sent on it just before the close was seen fails (aiohttp does not resend
        a POST). Connecting over the Unix socket costs tens of microseconds."""
        return aiohttp.ClientSession(
            BASE_URL,
            connector=aiohttp.UnixConnector(
                path=str(self.socket), limit=connections, force_close=True
            ),
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=timeout,
        )

    def launch(self) -> None:
        """Start the server's process now, before the worker serves: the model loads while the
        worker sets up (`start` waits for it). A failure is kept for `start` to raise."""
        if self._proc is not None or self._launch_error is not None:
            return
        binary = shutil.which(self.config.binary)
        if binary is None:
            self._launch_error = EngineError(
                f"llama.cpp's server ({self.config.binary}) was not found; ./dev install builds it"
            )
            return
        try:
            self._proc = Child(spawn(self.config.args(self.socket), self.config.env(self.api_key)))
        except OSError as exc:
            self._launch_error = EngineError(f"cannot start {binary}: {exc.strerror or exc}")

    async def start(self) -> None:
        self.launch()
        if self._launch_error is not None:
            raise self._launch_error
        assert self._proc is not None
        self._reader = asyncio.create_task(self._read_output(), name="llama-server-output")
        async with self.client(aiohttp.ClientTimeout(total=5.0), connections=2) as http:
            try:
                async with asyncio.timeout(self.load_timeout_s):
                    await self._wait_ready(http)
            except TimeoutError:
                raise EngineError(
                    f"llama.cpp's server did not load {self.config.model} "
                    f"within {self.load_timeout_s:g}s"
                ) from None
            props = await self._read_facts(http)
        if not self.config.embedding:
            # Learned once the server serves, a moment after, not before: until then llama.cpp
            # renders chats itself, into the same prompt, and neither a swap nor the first
            # request after it (which comes at once) shares the cores with the probes.
            self._learning = asyncio.create_task(
                self._learn_template(props, LEARN_AFTER_S), name="chat-template"
            )
        log.info(
            "llama-server (pid %d) serves %s: %d slot(s) of %d tokens, %d thread(s)%s%s",
            self._proc.pid,
            self.config.model.name,
            self.config.slots,
            self.context_size,
            self.config.threads,
            ", passive waiting" if self.config.passive_wait else "",
            ", tool calls in the model's own format" if self.native_tools else "",
        )

    async def _learn_template(self, props: dict[str, Any], after_s: float) -> None:
        await asyncio.sleep(after_s)
        try:
            async with self.client(aiohttp.ClientTimeout(total=5.0)) as http:
                self.chat_template = await self._own_template(http, props)
        except Exception:  # llama.cpp keeps rendering chats, as it does until this is known
            log.warning("could not check the chat template; llama.cpp renders it", exc_info=True)
        if self.chat_template is not None:
            log.info("the chat template is rendered by the worker")

    async def template_learned(self) -> ChatTemplate | None:
        """The chat template the worker renders, once it knows whether it can (None: llama.cpp
        renders chats)."""
        if self._learning is not None:
            await asyncio.shield(self._learning)
        return self.chat_template

    async def _read_output(self) -> None:
        assert self._proc is not None
        # Never stops draining before the end: a server blocked on a full pipe hangs the worker.
        async for line in read_lines(self._proc.stdout()):
            self._output.append(line)
            if line.endswith(LOADED_LINE):
                self._said_loaded.set()
            _server_log.debug("%s", line)

    async def _wait_ready(self, http: aiohttp.ClientSession) -> None:
        """Until `/health` says the model is loaded: asked again each time the server logs that
        it is (`model loaded`), else every READY_POLL_S, in case it never says so."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            while True:
                with contextlib.suppress(*NETWORK_ERRORS):
                    async with http.get("/health") as response:
                        if response.status == 200:
                            return
                said = asyncio.ensure_future(self._said_loaded.wait())
                await asyncio.wait({exited, said}, timeout=READY_POLL_S, return_when=FIRST)
                said.cancel()
                self._said_loaded.clear()
                if exited.done():
                    raise EngineError(await self._load_failure())
        finally:
            exited.cancel()

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

    async def _read_facts(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The context one slot really has, and the model's vocabulary and vector sizes; returns
        the server's /props."""

        async def get(path: str) -> Any:
            async with http.get(path) as response:
                return await response.json()

        try:
            # Both at once: the first request after a swap waits for them.
            props, models = await asyncio.gather(get("/props"), get("/v1/models"))
            self.context_size = int(props["default_generation_settings"]["n_ctx"])
            meta = models["data"][0]["meta"]
            self.vocab_size = int(meta["n_vocab"])
            self.embedding_size = int(meta["n_embd"])
            caps = props.get("chat_template_caps")
            self.native_tools = isinstance(caps, dict) and caps.get("supports_tools") is True
            return dict(props)
        except (*NETWORK_ERRORS, KeyError, IndexError, TypeError, ValueError) as exc:
            raise EngineError(f"llama.cpp's server does not describe its model: {exc!r}") from None

    async def _own_template(
        self, http: aiohttp.ClientSession, props: dict[str, Any]
    ) -> ChatTemplate | None:
        """The chat template to render in the worker: only one that renders the probes exactly
        as llama.cpp does (else every chat asks llama.cpp to apply it)."""
        source = props.get("chat_template")
        if not isinstance(source, str) or not source:
            return None
        template = compile_template(
            source, str(props.get("bos_token") or ""), str(props.get("eos_token") or "")
        )
        if template is None:
            log.info("the chat template is applied by llama.cpp (Jinja cannot compile it)")
            return None
        rendered: list[str | None] = []
        for probe in PROBES:
            body = {"messages": as_json(probe)}
            try:
                async with http.post("/apply-template", json=body) as response:
                    answer = await response.json() if response.status == 200 else {}
            except (*NETWORK_ERRORS, ValueError):
                return None
            prompt = answer.get("prompt")
            rendered.append(prompt if isinstance(prompt, str) else None)
        if not agrees_with(template, rendered):
            log.info("the chat template is applied by llama.cpp (rendered differently here)")
            return None
        return template

    async def failure(self) -> str:
        """Returns when the server exits, or stops answering, with the reason."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        hung = asyncio.ensure_future(self._stops_answering())
        try:
            await asyncio.wait({exited, hung}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            hung.cancel()
        stalled: str | None = None
        if hung.done() and not hung.cancelled():
            if (error := hung.exception()) is None:
                stalled = hung.result()
            else:  # from here on only an exit is noticed
                log.error("checking llama.cpp's server failed", exc_info=error)
        if stalled is not None and self._proc.returncode is None:
            reason = stalled
        else:
            code = await self._proc.wait()
            reason = f"llama.cpp's server exited with code {code}: {await self._last_words()}"
        if self._closing:
            await asyncio.Future()  # an exit we asked for is no failure: never returns
        return reason

    async def _stops_answering(self) -> str:
        """Returns once a check that goes through the server's main loop (`/slots`, which it
        answers between two batches) gets no answer within `stall_timeout_s`: a server that
        stopped there serves nobody, and the worker should say so rather than hold its
        requests. A refused connection is left to the exit it comes with."""
        timeout = aiohttp.ClientTimeout(total=self.stall_timeout_s)
        async with self.client(timeout) as http:
            while True:
                await asyncio.sleep(PROBE_INTERVAL_S)
                try:
                    async with http.get("/slots") as response:
                        await response.read()
                except TimeoutError:
                    return (
                        "llama.cpp's server stopped answering "
                        f"(no answer in {self.stall_timeout_s:g}s)"
                    )
                except NETWORK_ERRORS:
                    continue

    async def close(self) -> None:
        self._closing = True
        if self._learning is not None:
            self._learning.cancel()
            await asyncio.gather(self._learning, return_exceptions=True)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # Killed, not asked: by now nothing is in flight (the runtime drained it first), and
            # nothing it holds outlives it either way (it writes no files; its slots' caches
            # die with it). Its own shutdown took ~10 ms longer to free the memory (SmolLM2),
            # which a swap waits for. SIGKILL also ends a stopped (SIGSTOP) server.
            proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1.0)
        shutil.rmtree(self._dir, ignore_errors=True)
