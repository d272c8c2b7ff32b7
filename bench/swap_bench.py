"""Two models on memory that holds one: rbee next to llama.cpp's own router mode, in one run.

    .venv/bin/python bench/swap_bench.py [--tries 3] [--requests 64] [--clients 8] [--max-tokens 8]

rbee is a real queen and a real hive whose `--memory-limit` holds one of the two models but
not both; the queen starts a model's worker on demand and, when it does not fit, evicts the
least recently used idle one. The router is `llama-server --models-dir DIR --models-max 1` of
the same llama.cpp build, which loads a model on demand and evicts the other. Every model
process of either gets 2048 tokens and one slot (the queen's `--ctx-size 2048 --slots 1`, the
router's `--ctx-size 2048 --parallel 1`). Both are asked the same way: `/v1/completions` (Gemma 3 270M is a base model) with `model` naming the
model, greedy, `--max-tokens` tokens.

Two pairs of models, each with its own queen, hive and router:

  smollm2+gemma  SmolLM2-135M and Gemma 3 270M, hive limit 600 MiB: either fits alone, never
                 both (on a CPU estimated 319 + 513 MiB, held ~250 + ~440 MiB), so in either
                 system every alternation can be a swap.
  smollm2+copy   SmolLM2 and a copy of its file under another name, hive limit 400 MiB: only
                 one fits at a time in either system, so every alternation can be a swap.

For each it measures:
  swap to first token  one model loaded, the other asked for (streamed): request → first
                       token, median of --tries (every model stopped before each try); the
                       tries of the two systems take turns, both up, so both see the machine
                       alike (the one not measured idles);
  alternating load     --clients clients, each alternating the two models, --requests in all:
                       answered, failed or aborted, swaps (rbee: rbee_model_swaps_total on the
                       queen's /metrics; the router: model processes it started), p50/p95.

Targets (issue 23): rbee loses or aborts 0 requests; its swap to first token <= 1.2x the
router's; its p95 no worse than the router's.

A queen that answers 503 `insufficient_memory` instead of evicting ends the rbee side with
that error. Every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rbee.common.bundled import BUNDLED_MODELS, DEFAULT_MODEL, GEMMA_MODEL
from rbee_testing.metrics import has, parse_samples, value
from rbee_testing.processes import ServerProcess, console_script, free_port

LLAMA_SERVER = Path(sys.executable).parent / "llama-server"
COPY = "smollm2-copy.gguf"  # a hive names a model file it finds by its file name
CTX_SIZE = 2048  # every model process of either system: 2048 tokens, one slot
PROMPT = "The capital of France is"
REQUEST_TIMEOUT_S = 600.0  # patient: a swap under load on two busy cores can take a while
PAIRS: dict[str, tuple[str, str, str]] = {
    # name: (model A, model B, hive memory limit)
    "smollm2+gemma": (DEFAULT_MODEL, GEMMA_MODEL, "600MiB"),
    "smollm2+copy": (DEFAULT_MODEL, COPY, "400MiB"),
}


class InsufficientMemory(Exception):
    """The queen refused a model for lack of memory instead of evicting an idle worker."""


@dataclass
class Load:
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    swaps: int = 0
    wall_s: float = 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


@dataclass
class Result:
    swap_ttft_s: list[float]
    load: Load


class System:
    name = ""
    url = ""

    def reset(self) -> None:
        """Every model unloaded."""
        raise NotImplementedError

    def swaps(self) -> int:
        raise NotImplementedError

    def check(self, response: httpx.Response) -> None:
        """Raise on an answer that ends the benchmark rather than counting as a failure."""

    def model_id(self, model: str) -> str:
        """What this system calls the model (rbee: the hive's catalog id)."""
        return model


# -- rbee ----------------------------------------------------------------------------------


class Rbee(System):
    name = "rbee"

    def __init__(self, stack: ExitStack, models_dir: Path, logs: Path, limit: str) -> None:
        queen_port, hive_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{queen_port}"
        self.hive_id = f"swap-bench-{hive_port}"
        first = random.randrange(20000, 40000)
        queen = ServerProcess(
            [
                console_script("queen-rbee"), "--port", str(queen_port),
                "--queue-timeout", str(int(REQUEST_TIMEOUT_S)), "--spawn-timeout", "300",
                "--ctx-size", str(CTX_SIZE), "--slots", "1",
                "--data-dir", str(logs / "queen"),
            ],
            health_url=f"{self.url}/health",
        )  # fmt: skip
        hive = ServerProcess(
            [
                console_script("rbee-hive"), "--queen-url", self.url, "--port", str(hive_port),
                "--hive-id", self.hive_id, "--models-dir", str(models_dir),
                "--log-dir", str(logs / "hive"), "--worker-ports", f"{first}-{first + 50}",
                "--heartbeat-interval", "1", "--memory-limit", limit,
            ],
            health_url=f"http://127.0.0.1:{hive_port}/health",
        )  # fmt: skip
        stack.enter_context(queen.start(timeout_s=60))
        stack.enter_context(hive.start(timeout_s=120))
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
        stack.callback(self.client.close)
        stack.callback(self.reset)  # the hive leaves its workers running when it stops

    def wait_for_models(self, *models: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = {m["id"] for m in self.client.get("/v1/models").json()["data"]}
            if set(models) <= listed:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the hive never offered {models} to the queen")

    def reset(self) -> None:
        for worker in self.client.get("/v1/workers").json()["workers"]:
            self.run_job({"operation": "worker_stop", "worker_id": worker["id"]})

    def run_job(self, body: dict[str, object]) -> None:
        created = self.client.post("/v1/jobs", json=body)
        created.raise_for_status()
        with self.client.stream("GET", created.json()["sse_url"]) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["type"] in ("done", "error"):
                    return

    def swaps(self) -> int:
        samples = parse_samples(self.client.get("/metrics").text)
        if has(samples, "rbee_model_swaps_total"):
            return int(value(samples, "rbee_model_swaps_total"))
        return int(value(samples, "rbee_model_unloads_total", reason="evicted"))

    def check(self, response: httpx.Response) -> None:
        if response.status_code == 503 and b"insufficient_memory" in response.content:
            raise InsufficientMemory(
                "the queen answered 503 insufficient_memory instead of evicting an idle "
                f"worker: {response.text[:300]}"
            )


# -- llama.cpp's router ----------------------------------------------------------------------


class Router(System):
    name = "llama.cpp router"

    def __init__(self, stack: ExitStack, models_dir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = ServerProcess(
            [
                str(LLAMA_SERVER), "--models-dir", str(models_dir), "--models-max", "1",
                "--host", "127.0.0.1", "--port", str(port),
                "--ctx-size", str(CTX_SIZE), "--parallel", "1",
            ],
            health_url=f"{self.url}/health",
        )  # fmt: skip
        stack.enter_context(self.proc.start(timeout_s=60))
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
        stack.callback(self.client.close)

    def reset(self) -> None:
        for model in self.client.get("/models").json()["data"]:
            if model["status"]["value"] != "unloaded":
                self.client.post("/models/unload", json={"model": model["id"]})
        deadline = time.monotonic() + 60
        while any(
            m["status"]["value"] != "unloaded" for m in self.client.get("/models").json()["data"]
        ):
            assert time.monotonic() < deadline, "the router never unloaded its models"
            time.sleep(0.2)

    def model_id(self, model: str) -> str:
        # It names a model by its file name up to the first dot.
        return model.removesuffix(".gguf")

    def swaps(self) -> int:
        # Each model process it starts is a load; with --models-max 1 every one after the
        # first evicts the other model.
        return self.proc.output().count("spawning server instance with name=")


# -- measurements ----------------------------------------------------------------------------


def body(model: str, max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def complete(system: System, model: str, max_tokens: int) -> None:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        answer = client.post(
            f"{system.url}/v1/completions", json=body(system.model_id(model), max_tokens)
        )
    system.check(answer)
    answer.raise_for_status()


def first_token_s(system: System, model: str, max_tokens: int) -> float:
    """Streamed request → first text; SSE comments (rbee's `: loading`) are not text. The clock
    starts once the client is made (making one takes ~25 ms: its TLS context)."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        started = time.perf_counter()
        return _first_text(system, client, model, max_tokens, started)


def _first_text(
    system: System, client: httpx.Client, model: str, max_tokens: int, started: float
) -> float:
    with client.stream(
        "POST", f"{system.url}/v1/completions", json=body(system.model_id(model), max_tokens, True)
    ) as answer:
        if answer.status_code != 200:
            answer.read()
            system.check(answer)
            answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or [{}]
            if choices[0].get("text"):
                return time.perf_counter() - started
    raise RuntimeError(f"{system.name}: {model} streamed no text")


def swap_to_first_token(system: System, a: str, b: str, tries: int, max_tokens: int) -> list[float]:
    """With `a` loaded (and nothing else), how long `b` takes to its first token."""
    times = []
    for _ in range(tries):
        system.reset()
        complete(system, a, max_tokens)
        times.append(first_token_s(system, b, max_tokens))
    return times


async def alternating(
    system: System, a: str, b: str, requests: int, clients: int, max_tokens: int
) -> Load:
    load = Load()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    async def client(index: int, count: int, http: httpx.AsyncClient) -> None:
        for n in range(count):
            model = (a, b)[(index + n) % 2]
            started = time.perf_counter()
            try:
                answer = await http.post(
                    "/v1/completions", json=body(system.model_id(model), max_tokens)
                )
            except httpx.HTTPError as e:
                load.failed.append(f"{model}: {type(e).__name__}")
                continue
            system.check(answer)
            data = answer.json() if answer.status_code == 200 else {}
            choices = data.get("choices") or [{}]
            if answer.status_code != 200 or choices[0].get("finish_reason") not in (
                "length",
                "stop",
            ):
                load.failed.append(f"{model}: {answer.status_code} {answer.text[:120]}")
                continue
            load.answered += 1
            load.latencies_s.append(time.perf_counter() - started)

    swaps = system.swaps()
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=system.url, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as http:
        await asyncio.gather(*(client(i, n, http) for i, n in enumerate(per_client)))
    load.wall_s = time.perf_counter() - started
    load.swaps = system.swaps() - swaps
    return load


def measure(systems: list[System], a: str, b: str, args: argparse.Namespace) -> dict[str, Result]:
    """Swap to first token in tries taking turns (each try of one system next to one of the
    other, which goes first alternating), so that both see the machine alike; then the
    alternating load of each, the other with nothing loaded."""
    print(f"  swap to first token ({args.tries} tries each, taking turns)", file=sys.stderr)
    ttft: dict[str, list[float]] = {system.name: [] for system in systems}
    for n in range(args.tries):
        for system in systems if n % 2 == 0 else systems[::-1]:
            ttft[system.name] += swap_to_first_token(system, a, b, 1, args.max_tokens)
    results = {}
    for system in systems:
        for other in systems:
            other.reset()
        print(f"  {system.name}: alternating load", file=sys.stderr)
        load = asyncio.run(alternating(system, a, b, args.requests, args.clients, args.max_tokens))
        results[system.name] = Result(ttft[system.name], load)
    return results


# -- the run ---------------------------------------------------------------------------------


@contextmanager
def models_dirs(tmp: Path) -> Iterator[tuple[Path, Path]]:
    """(the hive's models dir, the router's models dir): the router names a model after its
    file's stem, so its files are named after rbee's model ids."""
    hive_dir, router_dir = tmp / "hive-models", tmp / "router-models"
    hive_dir.mkdir()
    router_dir.mkdir()
    smollm = BUNDLED_MODELS[DEFAULT_MODEL].ensure()
    gemma = BUNDLED_MODELS[GEMMA_MODEL].ensure()
    if smollm is None or gemma is None:
        raise SystemExit("the bundled models are not installed: run ./dev install")
    # A copy, not a link: the hive never follows a link out of its models dir.
    shutil.copy(smollm, hive_dir / COPY)
    for model_id, path in ((DEFAULT_MODEL, smollm), (GEMMA_MODEL, gemma)):
        (router_dir / f"{model_id}.gguf").symlink_to(path)
    # The router names a model by its file name less `.gguf`: the same id as the hive's.
    (router_dir / f"{COPY}.gguf").symlink_to(hive_dir / COPY)
    yield hive_dir, router_dir


def run_pair(
    pair: str, hive_dir: Path, router_dir: Path, tmp: Path, args: argparse.Namespace
) -> dict[str, Result]:
    a, b, limit = PAIRS[pair]
    print(f"{pair}: {a} and {b}", file=sys.stderr)
    # Both up at once, one measured at a time: the other idles, its model unloaded or idle.
    with ExitStack() as stack:
        router = Router(stack, router_dir)
        logs = Path(tempfile.mkdtemp(prefix=f"{pair}-", dir=tmp))
        rbee = Rbee(stack, hive_dir, logs, limit)
        rbee.wait_for_models(a, b)
        try:
            results = measure([router, rbee], a, b, args)
        except InsufficientMemory as e:
            raise SystemExit(f"rbee ({pair}, --memory-limit {limit}): {e}") from None
    return results


def report(pair: str, results: dict[str, Result], args: argparse.Namespace) -> None:
    a, b, limit = PAIRS[pair]
    print(f"\n{pair}: A={a}, B={b}; rbee-hive --memory-limit {limit}; router --models-max 1")
    print(
        f"{'system':<18}{'swap→1st token':>16}{'answered':>10}{'failed':>8}{'swaps':>7}"
        f"{'p50':>9}{'p95':>9}{'wall':>8}"
    )
    for name, r in results.items():
        load = r.load
        print(
            f"{name:<18}{statistics.median(r.swap_ttft_s):>15.2f}s"
            f"{load.answered:>7}/{args.requests:<3}{len(load.failed):>7}{load.swaps:>7}"
            f"{load.pct(0.5):>8.2f}s{load.pct(0.95):>8.2f}s{load.wall_s:>7.1f}s"
        )
        for failure in load.failed[:5]:
            print(f"    failed: {failure}")
    rbee, router = results["rbee"], results["llama.cpp router"]
    ttft = statistics.median(rbee.swap_ttft_s) / statistics.median(router.swap_ttft_s)
    lost = len(rbee.load.failed) + (args.requests - rbee.load.answered - len(rbee.load.failed))
    p95 = rbee.load.pct(0.95) / max(router.load.pct(0.95), 1e-9)
    print("targets (issue 23):")
    print(f"  rbee loses or aborts 0 requests:        {lost}  {'ok' if lost == 0 else 'MISSED'}")
    print(
        f"  swap→first token <= 1.2x the router's:  {ttft:.2f}x  {'ok' if ttft <= 1.2 else 'MISSED'}"
    )
    print(
        f"  p95 no worse than the router's:         {p95:.2f}x  {'ok' if p95 <= 1.0 else 'MISSED'}"
    )
    tries = ", ".join(
        f"{name} {' '.join(f'{t:.2f}' for t in r.swap_ttft_s)}" for name, r in results.items()
    )
    print(f"  (swap→first token tries, s: {tries})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    args = parser.parse_args()
    if not LLAMA_SERVER.exists():
        raise SystemExit(f"{LLAMA_SERVER} is missing: run ./dev install")
    with tempfile.TemporaryDirectory(prefix="rbee-swap-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with models_dirs(tmp) as (hive_dir, router_dir):
            print(
                f"swap_bench: {args.clients} clients, {args.requests} requests alternating "
                f"A/B, /v1/completions, {args.max_tokens} tokens, greedy"
            )
            for pair in args.pairs:  # each reported as soon as it is measured
                report(pair, run_pair(pair, hive_dir, router_dir, tmp, args), args)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
