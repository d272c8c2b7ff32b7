"""llama.cpp at its best beside llm-worker-rbee: one request, four at once, two workers per machine.

Same model, greedy decoding, the same chat prompt and token budget everywhere. "At its best" is
llama.cpp's own programs with all cores and default (spinning) OpenMP waiting: `llama-server`
for one request, `llama-batched-bench` for four sequences decoded together, each run with its
default f16 KV cache and with the q8_0 cache and flash attention a worker with several slots
uses, the faster counting. The baseline and the worker take turns, request by request (never
at once, which would split the cores), so both see the same machine; several rounds give the
spread. The first-token overhead compares the worker with llama-server on the same KV cache,
so it is the worker's own. Targets (issue 14):

  one request        worker tokens/s >= 0.95x llama-server's; first-token overhead <= 5 ms
  four at once       4-slot worker aggregate >= 0.9x llama-batched-bench (4 sequences);
                     its resident memory <= 1.5x a 1-slot worker's
  two workers        started through a hive with a core each: aggregate >= 1.15x one worker
                     alone, neither below 0.5x of it

    .venv/bin/python bench/worker_bench.py [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from rbee.common.cpus import usable_cpus
from rbee.worker.app import resolve_model
from rbee_testing.processes import ServerProcess, console_script, free_port

MODEL = "smollm2-135m-instruct"
# llama.cpp's KV cache settings tried for the baseline: its default, and the worker's.
KV_CACHES = {"f16": [], "q8_0": ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]}
WORKER_KV = "f16"  # a 1-slot worker's (--kv-cache-type auto); several slots take q8_0
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Run:
    ttft_s: float  # request sent → first generated text
    tokens: int
    first_s: float  # perf_counter of the first and last text
    last_s: float

    @property
    def tokens_per_s(self) -> float:
        # The first token's time is the TTFT; the rate is over the ones after it.
        span = self.last_s - self.first_s
        return (self.tokens - 1) / span if span > 0 else 0.0


def stream_chat(url: str, max_tokens: int, model: str = MODEL) -> Run:
    """One streamed chat, read with the standard library's client: it costs about a third of
    httpx's CPU per token, which on two cores comes out of the engine's (and, with four
    streams at once, out of the worker's side only, since llama-batched-bench has no client)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=300)
    started = time.perf_counter()
    first = last = 0.0
    pieces = 0
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status} {response.read()[:200]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    finally:
        conn.close()
    return Run(first - started, pieces, first, last)


def concurrent_chats(url: str, n: int, max_tokens: int) -> list[Run]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: stream_chat(url, max_tokens), range(n)))


def aggregate_rate(runs: list[Run]) -> float:
    """Tokens decoded per second by all the runs together, from the first first token on."""
    span = max(r.last_s for r in runs) - min(r.first_s for r in runs)
    return sum(r.tokens - 1 for r in runs) / span if span > 0 else 0.0


def resident_bytes(pid: int) -> int:
    """A process's resident memory with its children's (the worker's engine is one)."""
    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(True))


def binary(name: str) -> str:
    return console_script(name)


# ---- llama.cpp on its own ---------------------------------------------------------------


@contextmanager
def llama_server(
    model: Path, threads: int, slots: int, ctx: int, kv: str
) -> Iterator[ServerProcess]:
    port = free_port()
    args = [binary("llama-server"), "--model", str(model), "--port", str(port)]
    args += ["--parallel", str(slots), "--no-kv-unified", "--kv-unified-per-slot", str(ctx)]
    args += ["--threads", str(threads), "--threads-batch", str(threads), "--no-webui"]
    args += KV_CACHES[kv]
    with ServerProcess(args, health_url=f"http://127.0.0.1:{port}/health") as proc:
        yield proc


def batched_bench(model: Path, threads: int, sequences: int, max_tokens: int, kv: str) -> float:
    """llama.cpp's own batched decoding: aggregate generation tokens/s (S_TG) for N sequences."""
    args = [binary("llama-batched-bench"), "-m", str(model), "-t", str(threads), *KV_CACHES[kv]]
    # Its default KV cache: a stretch of its own for each sequence, as the worker has.
    args += ["-c", str(sequences * 512), "-npp", "64", "-ntg", str(max_tokens)]
    args += ["-npl", str(sequences), "--output-format", "jsonl"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return float(rows[-1]["speed_tg"])


# ---- the worker -------------------------------------------------------------------------


@contextmanager
def worker(slots: int, threads: int) -> Iterator[ServerProcess]:
    port = free_port()
    args = [console_script("llm-worker-rbee"), "--model", MODEL, "--port", str(port)]
    # Nobody listens there: the worker's heartbeats fail quietly and cost nothing here.
    args += ["--queen-url", f"http://127.0.0.1:{free_port()}"]
    args += ["--slots", str(slots), "--threads", str(threads), "--queue-size", "16"]
    with ServerProcess(args, health_url=f"http://127.0.0.1:{port}/health") as proc:
        yield proc


@contextmanager
def hive(tmp: Path) -> Iterator[str]:
    port, first = free_port(), free_port()
    args = [console_script("rbee-hive"), "--queen-url", f"http://127.0.0.1:{free_port()}"]
    args += ["--port", str(port), "--hive-id", f"bench-{port}", "--models-dir", str(tmp / "models")]
    args += ["--log-dir", str(tmp / "logs"), "--worker-ports", f"{first}-{first + 50}"]
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(args, health_url=f"{url}/health"):
        yield url


def spawn(hive_url: str, cores: int) -> dict[str, object]:
    body = {"model": MODEL, "cores": cores}
    response = httpx.post(f"{hive_url}/v1/workers/spawn", json=body, timeout=300)
    response.raise_for_status()
    spawned: dict[str, object] = response.json()
    return spawned


def stop(hive_url: str, pid: object) -> None:
    # The hive takes JSON bodies only, even an empty one.
    httpx.post(f"{hive_url}/v1/workers/{pid}/stop", json={}, timeout=60).raise_for_status()


# ---- the rounds -------------------------------------------------------------------------


def url_of(proc: ServerProcess) -> str:
    assert proc.health_url is not None
    return proc.health_url.removesuffix("/health")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="requests per figure per round")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--ttft-pairs", type=int, default=20, help="extra short turns per round for first tokens"
    )
    parser.add_argument("--ctx-size", type=int, default=2048)
    args = parser.parse_args()
    cores = len(usable_cpus())
    model = resolve_model(MODEL)
    n, budget = args.repeats, args.max_tokens
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no}/{args.rounds} ...", file=sys.stderr, flush=True)
        # One request at a time: llama-server (each KV cache) and the worker take turns, request
        # by request, so a machine that speeds up or slows down meanwhile does so for all.
        # Only one of them works at any moment; the others wait with their threads asleep.
        with ExitStack() as stack:
            urls = {
                **{
                    kv: url_of(
                        stack.enter_context(llama_server(model, cores, 1, args.ctx_size, kv))
                    )
                    for kv in KV_CACHES
                },
                "worker": url_of(one := stack.enter_context(worker(1, cores))),
            }
            for url in urls.values():
                stream_chat(url, 8)  # warm-up: page the weights in
            runs: dict[str, list[Run]] = {name: [] for name in urls}
            for _ in range(n):
                for name, url in urls.items():
                    runs[name].append(stream_chat(url, budget))
            for kv in KV_CACHES:
                add(f"server_rate_{kv}", statistics.median(r.tokens_per_s for r in runs[kv]))
            add("worker_rate", statistics.median(r.tokens_per_s for r in runs["worker"]))
            add("worker1_rss", resident_bytes(one.pid) / 2**20)
            # First tokens: more turns of short answers, the worker right after llama-server on
            # the same KV cache; the overhead is the median of each turn's difference.
            for _ in range(args.ttft_pairs):
                for name in (WORKER_KV, "worker"):
                    runs[name].append(stream_chat(urls[name], 1))
            for kv in KV_CACHES:
                add(f"server_ttft_{kv}", statistics.median(r.ttft_s for r in runs[kv]))
            add("worker_ttft", statistics.median(r.ttft_s for r in runs["worker"]))
            pairs = zip(runs["worker"], runs[WORKER_KV], strict=True)
            add("ttft_overhead", statistics.median(w.ttft_s - s.ttft_s for w, s in pairs))
        add("server_rate", max(figures[f"server_rate_{kv}"][-1] for kv in KV_CACHES))
        # Four sequences at once: llama.cpp's batched decoding and a 4-slot worker take turns.
        with worker(4, cores) as four:
            url = url_of(four)
            concurrent_chats(url, 4, 8)
            rates, ttfts, batched = [], [], []
            for _ in range(n):
                batched.append(max(batched_bench(model, cores, 4, budget, kv) for kv in KV_CACHES))
                runs4 = concurrent_chats(url, 4, budget)
                rates.append(aggregate_rate(runs4))
                ttfts.append(statistics.median(r.ttft_s for r in runs4))
            add("batched4", statistics.median(batched))
            add("worker4_rate", statistics.median(rates))
            add("worker4_ttft", statistics.median(ttfts))
            add("worker4_rss", resident_bytes(four.pid) / 2**20)
        # Two workers started through a hive, a core of their own each.
        with tempfile.TemporaryDirectory() as tmp, hive(Path(tmp)) as hive_url:
            spawned = [spawn(hive_url, max(1, cores // 2)) for _ in range(2)]
            urls = [str(s["url"]) for s in spawned]
            try:
                for url in urls:
                    stream_chat(url, 8)
                pairs = []
                for _ in range(n):
                    with concurrent.futures.ThreadPoolExecutor(2) as pool:
                        pairs.append(list(pool.map(lambda u: stream_chat(u, budget), urls)))
                add("pair_a", statistics.median(p[0].tokens_per_s for p in pairs))
                add("pair_b", statistics.median(p[1].tokens_per_s for p in pairs))
                placed = ", ".join(f"{s['cpu_set']}{' shared' if s['shared_cores'] else ''}"
                                   for s in spawned)  # fmt: skip
            finally:
                for s in spawned:
                    stop(hive_url, s["pid"])

    def spread(name: str, scale: float = 1.0, unit: str = "") -> str:
        values = [v * scale for v in figures[name]]
        mid = statistics.median(values)
        return f"{mid:8.1f}{unit} ({min(values):.1f}–{max(values):.1f})"

    def ratio(top: str, bottom: str) -> list[float]:
        return [a / b for a, b in zip(figures[top], figures[bottom], strict=True)]

    def ratio_text(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    print(f"model {model.name}, {cores} cores, {budget} tokens, greedy; median (min–max) of "
          f"{args.rounds} rounds, each the median of {n} requests (first tokens: "
          f"{n + args.ttft_pairs} turns)")  # fmt: skip
    print("one request")
    for kv in KV_CACHES:
        print(f"  llama-server, {kv:4s} KV      {spread(f'server_rate_{kv}')} tok/s   "
              f"TTFT {spread(f'server_ttft_{kv}', 1000, ' ms')}")  # fmt: skip
    print(f"  llm-worker-rbee --slots 1    {spread('worker_rate')} tok/s   "
          f"TTFT {spread('worker_ttft', 1000, ' ms')}   RSS {spread('worker1_rss')} MB")  # fmt: skip
    rate_ratio = ratio("worker_rate", "server_rate")
    overhead = [v * 1000 for v in figures["ttft_overhead"]]
    print(f"  worker / llama-server best   {ratio_text(rate_ratio)}   (target >= 0.95)")
    print(f"  first-token overhead ({WORKER_KV})  {statistics.median(overhead):+.1f} ms "
          f"({min(overhead):+.1f}–{max(overhead):+.1f})   (target <= 5 ms)")  # fmt: skip
    print("four requests at once")
    print(f"  llama-batched-bench (4 seq)  {spread('batched4')} tok/s aggregate (best KV cache)")
    print(f"  llm-worker-rbee --slots 4    {spread('worker4_rate')} tok/s aggregate   "
          f"TTFT {spread('worker4_ttft', 1000, ' ms')}   RSS {spread('worker4_rss')} MB")  # fmt: skip
    print(
        f"  worker / batched-bench       {ratio_text(ratio('worker4_rate', 'batched4'))}   (target >= 0.9)"
    )
    print(
        f"  memory 4 slots / 1 slot      {ratio_text(ratio('worker4_rss', 'worker1_rss'))}   (target <= 1.5)"
    )
    print(f"two workers through a hive (cores {placed}), one request each at once")
    both = [a + b for a, b in zip(figures["pair_a"], figures["pair_b"], strict=True)]
    lower = [min(a, b) for a, b in zip(figures["pair_a"], figures["pair_b"], strict=True)]
    print(f"  each                         {spread('pair_a')} / {spread('pair_b')} tok/s")
    print(f"  aggregate / one alone        "
          f"{ratio_text([t / w for t, w in zip(both, figures['worker_rate'], strict=True)])}   (target >= 1.15)")  # fmt: skip
    print(f"  slower / one alone           "
          f"{ratio_text([s / w for s, w in zip(lower, figures['worker_rate'], strict=True)])}   (target >= 0.5)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
