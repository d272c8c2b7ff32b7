"""Prefix routing next to least-loaded routing, on real workers, in one run (issue 26).

    .venv/bin/python bench/affinity_bench.py [--conversations 24] [--turns 6] [--clients 4]
        [--open 1] [--system-tokens 1500] [--unique 48] [--max-tokens 8] [--shared-system]
        [--think 0]

For each policy (`prefix`, `least-loaded`) a cluster of its own, both up at once: queen-rbee
with that `--routing-policy`, one rbee-hive, and three workers of SmolLM2-135M started through
the queen (2 slots of 4096 tokens each, passive waits so the idle cluster costs nothing), so
both policies start from cold caches. On each, two workloads (multi-turn on one cluster, then on
the other; the unique prompts in --rounds rounds taking turns which goes first):

  multi-turn  --conversations conversations of --turns turns, --clients at once, each client
              keeping --open conversations going (a turn of each in turn, as an agent runs
              sub-agents or a person keeps several chats) and taking the next when one ends
              (--open 1: one conversation after another). Each conversation has its own
              system prompt of about --system-tokens tokens (a coding agent's instructions and
              its project's context); each turn adds a question of about 60 tokens and the
              answer. With --shared-system all conversations share one system prompt instead
              (then every worker soon caches it, whatever the policy). --think S: a pause of S
              seconds between a turn's answer and the next turn (a person reading, a tool
              running); with none, a client's next turn finds the worker it just left the least
              loaded, so least-loaded routing keeps most conversations on one worker by itself.
              A worker holds a conversation in a slot, or, once the slot moved on, in its
              prompt cache (llama-server's --cache-ram), which rbee sizes as the worker's KV
              cache: here 2 x 4096 tokens at q8_0 (~95 MiB), room for about four conversations
              of ~2,000 tokens besides the two in its slots. --open 3 or 4 puts 12 or 16
              conversations in flight: more than one worker holds, about what three do.
  unique      --unique requests of about 400 tokens that share no prefix, --clients at once.

Every request streams (`stream_options.include_usage`), greedy, at most --max-tokens tokens. It
prints, per policy and workload: time to first token p50/p95 (request sent -> first content
chunk), throughput (requests/s and prompt + completion tokens/s over the workload's wall time),
and the share of prompt tokens llama-server served from its KV cache (its own timings, in each
answer's `usage.prompt_tokens_details.cached_tokens`), and the queen's route decisions.

Targets (issue 26): multi-turn TTFT p50 at least 2x better under prefix than least-loaded;
unique throughput under prefix >= 0.95x least-loaded.

Every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.metrics import parse_samples
from rbee_testing.processes import ServerProcess, console_script, free_port

POLICIES = ("prefix", "least-loaded")
WORKERS = 3
SLOTS = 2
CTX_SIZE = 4096
REQUEST_TIMEOUT_S = 600.0
RECOMPUTE_TOKENS = 500  # a later turn that evaluates more prompt tokens missed the cache
WORDS = [
    "build", "test", "module", "function", "return", "value", "error", "handler", "request",
    "worker", "queue", "cache", "token", "prompt", "model", "server", "client", "stream",
    "socket", "thread", "lock", "buffer", "file", "path", "config", "option", "flag", "parse",
    "render", "format", "schema", "field", "record", "index", "table", "query", "commit",
    "branch", "merge", "review", "deploy", "release", "version", "package", "import", "export",
    "class", "method", "object", "list", "map", "set", "string", "number", "integer", "float",
    "boolean", "null", "timeout", "retry", "backoff", "limit", "memory", "device", "slot",
    "layer",
]  # fmt: skip


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def system_prompt(seed: int, tokens: int) -> str:
    """About `tokens` tokens (SmolLM2 takes these words as about one token each, plus
    punctuation): instructions and a project's notes, distinct for each seed."""
    rng = random.Random(seed)
    lines = [f"You are the coding agent of project {seed}. Follow the project's rules."]
    while sum(len(line.split()) for line in lines) < tokens * 0.8:
        lines.append(f"- {words(rng, 14).capitalize()}.")
    return "\n".join(lines)


@dataclass
class Figures:
    ttft: list[float] = field(default_factory=list)
    # Multi-turn: the first turns' TTFT (cold whatever the policy) and the later turns'.
    first_turns: list[float] = field(default_factory=list)
    later_turns: list[float] = field(default_factory=list)
    # Multi-turn, later turns: the prompt tokens llama-server evaluated rather than took from
    # its cache (its own count: prompt tokens less cached ones), and each one's TTFT.
    later_evaluated: list[int] = field(default_factory=list)
    later_hits: list[float] = field(default_factory=list)  # TTFT where the cache served it
    later_recomputed: list[float] = field(default_factory=list)  # TTFT where it did not
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    failed: int = 0
    wall_s: float = 0.0

    def pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.ttft) if self.ttft else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Cluster:
    """queen-rbee with one routing policy, a hive, and WORKERS workers of SmolLM2."""

    def __init__(self, stack: ExitStack, tmp: Path, policy: str, cores: int | None) -> None:
        queen_port, hive_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{queen_port}"
        self.hive_id = f"affinity-bench-{hive_port}"
        first = random.randrange(20000, 40000)
        queen = ServerProcess(
            [
                console_script("queen-rbee"), "--port", str(queen_port),
                "--routing-policy", policy, "--max-replicas", str(WORKERS),
                "--queue-timeout", str(int(REQUEST_TIMEOUT_S)),
                "--data-dir", str(tmp / "queen"),
            ],
            health_url=f"{self.url}/health",
        )  # fmt: skip
        hive = ServerProcess(
            [
                console_script("rbee-hive"), "--queen-url", self.url, "--port", str(hive_port),
                "--hive-id", self.hive_id, "--models-dir", str(tmp / "models"),
                "--log-dir", str(tmp / "logs"), "--worker-ports", f"{first}-{first + 50}",
                "--heartbeat-interval", "1",
            ],
            health_url=f"http://127.0.0.1:{hive_port}/health",
        )  # fmt: skip
        stack.enter_context(queen.start(timeout_s=60))
        stack.enter_context(hive.start(timeout_s=120))
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
        stack.callback(self.client.close)
        stack.callback(self.reset)  # the hive leaves its workers running when it stops
        deadline = time.monotonic() + 60
        while not any(
            h["id"] == self.hive_id for h in self.client.get("/v1/hives").json()["hives"]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the hive never reached the queen")
            time.sleep(0.2)
        for _ in range(WORKERS):
            self.run_job(
                {
                    "operation": "worker_spawn",
                    "model": DEFAULT_MODEL,
                    "hive_id": self.hive_id,
                    "slots": SLOTS,
                    "ctx_size": CTX_SIZE,
                    **({"cores": cores} if cores else {}),
                }
            )

    def run_job(self, body: dict[str, object]) -> None:
        created = self.client.post("/v1/jobs", json=body)
        created.raise_for_status()
        with self.client.stream("GET", created.json()["sse_url"]) as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if event["type"] == "error":
                        raise RuntimeError(f"job {body['operation']} failed: {event}")
                    if event["type"] == "done":
                        return

    def reset(self) -> None:
        for worker in self.client.get("/v1/workers").json()["workers"]:
            self.run_job({"operation": "worker_stop", "worker_id": worker["id"]})

    def decisions(self) -> dict[str, int]:
        samples = parse_samples(self.client.get("/metrics").text)
        return {
            dict(labels)["outcome"]: int(count)
            for (name, labels), count in samples.items()
            if name == "rbee_route_decisions_total"
        }


async def ask(
    http: httpx.AsyncClient,
    messages: list[dict[str, str]],
    max_tokens: int,
    figures: Figures,
    turn: int | None = None,
) -> str:
    body = {
        "model": DEFAULT_MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    evaluated = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            figures.failed += 1
            return ""
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data: dict[str, Any] = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if choice.get("delta", {}).get("content"):
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(choice["delta"]["content"])
            if usage := data.get("usage"):
                figures.prompt_tokens += usage["prompt_tokens"]
                figures.completion_tokens += usage["completion_tokens"]
                details = usage.get("prompt_tokens_details") or {}
                figures.cached_tokens += details.get("cached_tokens", 0)
                evaluated = usage["prompt_tokens"] - details.get("cached_tokens", 0)
    figures.requests += 1
    ttft = (first or time.perf_counter()) - started
    figures.ttft.append(ttft)
    if turn == 0:
        figures.first_turns.append(ttft)
    elif turn is not None:
        figures.later_turns.append(ttft)
        figures.later_evaluated.append(evaluated)
        if evaluated <= RECOMPUTE_TOKENS:
            figures.later_hits.append(ttft)
        else:
            figures.later_recomputed.append(ttft)
    return "".join(pieces)


async def multi_turn(url: str, args: argparse.Namespace) -> Figures:
    figures = Figures()
    shared = system_prompt(0, args.system_tokens)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(args.conversations):
        queue.put_nowait(n)

    @dataclass
    class Conversation:
        rng: random.Random
        messages: list[dict[str, str]]
        turn: int = 0

    def opened(n: int) -> Conversation:
        system = shared if args.shared_system else system_prompt(n + 1, args.system_tokens)
        return Conversation(random.Random(1000 + n), [{"role": "system", "content": system}])

    async def client(http: httpx.AsyncClient) -> None:
        # Up to --open conversations at once, a turn of each in turn; a finished one makes
        # way for the next in the queue.
        open_: list[Conversation] = []
        while open_ or not queue.empty():
            while len(open_) < args.open and not queue.empty():
                open_.append(opened(queue.get_nowait()))
            for talk in list(open_):
                question = f"Step {talk.turn}: {words(talk.rng, 50)}. What should change first?"
                talk.messages.append({"role": "user", "content": question})
                answer = await ask(http, talk.messages, args.max_tokens, figures, talk.turn)
                talk.messages.append({"role": "assistant", "content": answer or "(none)"})
                talk.turn += 1
                if talk.turn == args.turns:
                    open_.remove(talk)
                elif args.think:
                    await asyncio.sleep(args.think)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    figures.wall_s = time.perf_counter() - started
    return figures


async def unique(url: str, args: argparse.Namespace, seed: int) -> Figures:
    figures = Figures()
    rng = random.Random(seed)
    prompts = [f"Request {seed}-{i}. {words(rng, 380)}. Summarize." for i in range(args.unique)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            await ask(http, [{"role": "user", "content": prompt}], args.max_tokens, figures)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    figures.wall_s = time.perf_counter() - started
    return figures


def line(policy: str, f: Figures) -> str:
    return (
        f"  {policy:<13} TTFT p50 {f.p50 * 1000:7.0f} ms  p95 {f.pct(0.95) * 1000:7.0f} ms  "
        f"{f.requests_per_s:5.2f} req/s  {f.tokens_per_s:7.0f} tok/s  "
        f"cached {f.cached_share * 100:5.1f}%  ({f.requests} ok, {f.failed} failed)"
    )


def median(values: list[float] | list[int]) -> float:
    return statistics.median(values) if values else float("nan")


def turns_line(policy: str, f: Figures) -> str:
    """Where a multi-turn TTFT comes from: first turns (cold under any policy) against later
    ones, and of the later ones those llama-server recomputed (it evaluated more than
    RECOMPUTE_TOKENS of the prompt: the cache it was sent to did not hold the conversation)
    against those its cache served."""
    recomputed = len(f.later_recomputed)
    cold = len(f.first_turns) + recomputed
    return (
        f"  {policy:<13} first turns p50 {median(f.first_turns) * 1000:6.0f} ms; later turns "
        f"p50 {median(f.later_turns) * 1000:6.0f} ms, {recomputed}/{len(f.later_turns)} "
        f"recomputed (p50 {median(f.later_recomputed) * 1000:6.0f} ms), cache hits' p50 "
        f"{median(f.later_hits) * 1000:6.0f} ms; cold or recomputed {cold}/{len(f.ttft)} requests"
    )


def report(results: dict[str, dict[str, Figures]], decisions: dict[str, dict[str, int]]) -> None:
    for workload in ("multi-turn", "unique"):
        if workload not in results[POLICIES[0]]:
            continue
        print(f"\n{workload}:")
        for policy in POLICIES:
            print(line(policy, results[policy][workload]))
    print("\nmulti-turn, by turn (llama-server's timings):")
    for policy in POLICIES:
        print(turns_line(policy, results[policy]["multi-turn"]))
    print("\nroute decisions (rbee_route_decisions_total):")
    for policy in POLICIES:
        print(f"  {policy:<13} {decisions[policy]}")
    prefix, least = results["prefix"], results["least-loaded"]
    ttft_gain = least["multi-turn"].p50 / prefix["multi-turn"].p50
    p95_gain = least["multi-turn"].pct(0.95) / prefix["multi-turn"].pct(0.95)
    print("\ntargets (issue 26):")
    verdict = "met" if ttft_gain >= 2 else "MISSED"
    print(f"  multi-turn TTFT p50, least-loaded / prefix: {ttft_gain:.2f}x (>= 2x: {verdict})")
    print(f"  multi-turn TTFT p95, least-loaded / prefix: {p95_gain:.2f}x")
    if "unique" not in prefix:
        return
    throughput = prefix["unique"].tokens_per_s / least["unique"].tokens_per_s
    verdict = "met" if throughput >= 0.95 else "MISSED"
    print(f"  unique throughput, prefix / least-loaded: {throughput:.2f}x (>= 0.95x: {verdict})")


def merged(parts: list[Figures]) -> Figures:
    total = Figures()
    for f in parts:
        total.ttft += f.ttft
        total.prompt_tokens += f.prompt_tokens
        total.cached_tokens += f.cached_tokens
        total.completion_tokens += f.completion_tokens
        total.requests += f.requests
        total.failed += f.failed
        total.wall_s += f.wall_s
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--unique", type=int, default=48, help="0: no unique prompts")
    parser.add_argument("--rounds", type=int, default=3, help="unique prompts, in rounds")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--shared-system", action="store_true")
    parser.add_argument(
        "--open", type=int, default=1, help="conversations each client keeps going at once"
    )
    parser.add_argument(
        "--think", type=float, default=0.0, help="seconds between a turn's answer and the next"
    )
    parser.add_argument(
        "--cores", type=int, default=1, help="cores (llama.cpp threads) per worker, 0: the hive's"
    )
    args = parser.parse_args()
    # A stop by signal still stops every process started here (the ExitStacks unwind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Both clusters stay up; the idle one's threads must not spin while the other works.
    os.environ.setdefault("RBEE_WORKER_WAIT_POLICY", "passive")
    results: dict[str, dict[str, Figures]] = {p: {} for p in POLICIES}
    with ExitStack() as stack:
        clusters = {}
        for policy in POLICIES:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-bench-")))
            print(f"{policy}: starting a queen, a hive and {WORKERS} workers...", flush=True)
            clusters[policy] = Cluster(stack, tmp, policy, args.cores)
        for policy in POLICIES:
            started = time.perf_counter()
            figures = asyncio.run(multi_turn(clusters[policy].url, args))
            results[policy]["multi-turn"] = figures
            took = time.perf_counter() - started
            print(f"{line(policy, figures)}  [multi-turn, {took:.0f} s]", flush=True)
            print(turns_line(policy, figures), flush=True)
        # Unique prompts in rounds, taking turns which policy goes first, so that the load of
        # a shared machine falls on both alike; each round's prompts are the same for both.
        per_round = argparse.Namespace(**{**vars(args), "unique": args.unique // args.rounds})
        parts: dict[str, list[Figures]] = {p: [] for p in POLICIES}
        for r in range(args.rounds if args.unique else 0):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for policy in order:
                figures = asyncio.run(unique(clusters[policy].url, per_round, seed=7 + r))
                parts[policy].append(figures)
                print(f"{line(policy, figures)}  [unique, round {r + 1}]", flush=True)
        for policy in POLICIES:
            if parts[policy]:
                results[policy]["unique"] = merged(parts[policy])
        decisions = {policy: clusters[policy].decisions() for policy in POLICIES}
    report(results, decisions)


if __name__ == "__main__":
    main()
