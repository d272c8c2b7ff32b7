"""One model split over several machines (issue 24): rbee's split against one host and against
llama.cpp's own RPC setup on the same placement.

    sudo .venv/bin/python bench/split_bench.py [--ways 2,3] [--requests 3] [--lan bare,home]
    sudo .venv/bin/python bench/split_bench.py --home-lan   # the home-LAN run only

Each layout runs on its own test LAN (network namespaces, `rbee_testing.netns`; needs root and
iproute2), a queen on one machine and a hive on each of the others:

- one host: one hive with no memory limit; SmolLM2 loads there whole;
- rbee split over N: N hives whose --memory-limit holds SmolLM2 on no fewer than N of them
  (queen-rbee --split-across-hives): the queen splits it, helpers lend RPC servers behind rbee's
  token-authenticated tunnels;
- raw over N: the same llama-server command line rbee's worker ran (same layers, tensor split,
  threads), pointed straight at `ggml-rpc-server`s listening on the helpers' LAN addresses with
  the same flags: llama.cpp's engine without rbee (which only a benchmark may expose so).

Every request is a chat at temperature 0 (a ~300-token prompt of its own, 128 tokens out),
streamed; prompt tok/s is the prompt's tokens over the time to the first token, decode tok/s the
tokens after the first over the time they took, both medians of `--requests`. Load time is the
first request's wait (rbee: an on-demand start, helpers included) or llama-server's start until
/health answers (raw, RPC servers already up).

The home LAN (`--lan home`, or `--home-lan` for it alone): 1 ms one-way delay and 1 Gbit/s on
every machine's link, set before anything starts. With `tc netem delay 1ms rate 1gbit` where the
kernel has netem; else `tc ... tbf rate 1gbit` for the rate and, for the delay, a relay of this
benchmark's own between each machine and the LAN's switch (`--relay`, run in the switch
namespace): it holds every frame a machine sends for 1 ms (as netem on its link would), and
passes frames to it at once. The output says which was used.

Engine settings (`--settings`, on the first split's raw engine): llama.cpp's `ggml-rpc-server`
threads (`-t`: llama.cpp's default 1 against rbee's, every core of the hive), and its tensor
cache `-c` (a reload's time with and without it: with it, the RPC server keeps the tensors it
was sent in a local file, and llama-server sends only their hashes the next time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing import netns
from rbee_testing.lan_cluster import LanCluster
from split_lan import has_netem, shaping
from split_raw import SPIN, Part, RawEngine

# SmolLM2 at 2048 tokens x 1 slot: ~275 MiB on one CPU; a split device needs ~137 MiB of
# compute buffer and slack, and the model's 144 MiB of weights and KV cache are shared out.
LIMITS = {2: "230MiB", 3: "197MiB"}
# Every layout's worker gets the same context and slots (so the same KV cache type, f16).
QUEEN_FLAGS = (
    "--split-across-hives",
    *("--ctx-size", "2048", "--slots", "1"),
    *("--queue-timeout", "600", "--keep-alive", "-1"),
)
PROMPT = " ".join(
    f"Item {i}: the {c} box holds {i * 3} marbles."
    for i, c in enumerate(["red", "blue", "green", "white", "black", "amber"] * 4)
)
CHAT: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": f"{PROMPT}\nWrite a long story about the boxes."}],
    "max_tokens": 128,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@dataclass
class Figures:
    name: str
    load_s: float
    prompt_tps: float | None = None  # None: a row of load time only
    decode_tps: float | None = None


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    """Where a setup's chats go: a URL, its headers, and a unix socket when it listens on one."""

    name: str
    url: str
    headers: dict[str, str]
    uds: str | None = None


def timed_chat(target: Target, body: dict[str, Any]) -> tuple[float, float, int, int]:
    """(seconds to the first token, seconds from it to the last, prompt tokens, tokens out)."""
    url, headers = target.url, target.headers
    transport = httpx.HTTPTransport(uds=target.uds) if target.uds else None
    started = time.monotonic()
    first = last = 0.0
    prompt_tokens = completion_tokens = chunks = 0
    with (
        httpx.Client(timeout=900, transport=transport) as client,
        client.stream("POST", url, json=body, headers=headers) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            data = json.loads(line.removeprefix("data:"))
            if data.get("error"):
                raise RuntimeError(f"{url}: {data['error']}")
            if data.get("usage"):
                prompt_tokens = data["usage"]["prompt_tokens"]
                completion_tokens = data["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in data.get("choices", [])):
                now = time.monotonic()
                first = first or now
                last = now
                chunks += 1
    return first - started, last - first, prompt_tokens, completion_tokens or chunks


RUNS = itertools.count(1000)


def chat_body() -> dict[str, Any]:
    """A chat whose prompt no chat of this run had before (llama.cpp would serve a repeated one
    from its cache, and setups share engines: the raw engine is measured beside rbee and beside
    each of the settings), as long as every other one's."""
    (message,) = CHAT["messages"]
    content = f"Run {next(RUNS)}. {message['content']}"
    return {**CHAT, "messages": [{**message, "content": content}]}


def first_token(target: Target) -> float:
    """A one-token chat's wait: the load time of an on-demand start, else a warm-up."""
    return timed_chat(target, {**CHAT, "max_tokens": 1})[0]


def interleaved(targets: list[Target], requests: int) -> dict[str, tuple[float, float]]:
    """Each target's (prompt, decode) tok/s, medians of `requests` chats, taken in turns: chat
    n goes to every target before chat n+1 goes to any, in an order that alternates (forward,
    then backward), so neither a busy moment on the shared cores nor going first or last
    favours one of them. A warm-up chat each first (its own prompt)."""
    for target in targets:
        timed_chat(target, {**chat_body(), "max_tokens": 8})
    prompt: dict[str, list[float]] = {t.name: [] for t in targets}
    decode: dict[str, list[float]] = {t.name: [] for t in targets}
    for n in range(requests):
        for i in range(len(targets)) if n % 2 == 0 else reversed(range(len(targets))):
            target = targets[i]
            ttft, rest, prompt_tokens, out = timed_chat(target, chat_body())
            prompt[target.name].append(prompt_tokens / ttft)
            decode[target.name].append((out - 1) / rest if rest > 0 else 0.0)
    medians = {}
    for target in targets:
        p, d = statistics.median(prompt[target.name]), statistics.median(decode[target.name])
        medians[target.name] = (p, d)
        runs = " ".join(f"{x:.0f}" for x in decode[target.name])
        say(f"  {target.name}: prompt {p:.0f} tok/s, decode {d:.1f} tok/s (decode runs: {runs})")
    return medians


def measure(target: Target, requests: int) -> Figures:
    """One setup alone, its first chat an on-demand start (its wait is the load time)."""
    load_s = first_token(target)
    prompt, decode = interleaved([target], requests)[target.name]
    return Figures(target.name, load_s, prompt, decode)


def one_host(logs: Path, requests: int, shaped: bool, netem: bool) -> Figures:
    with netns.Lan(["queen", "box1"]) as lan, shaping(lan, shaped, netem):
        cluster = LanCluster(lan, logs / "one")
        cluster.logs.mkdir(parents=True, exist_ok=True)
        cluster.start_queen(*QUEEN_FLAGS)
        cluster.start_hive("box1")
        url = f"{cluster.queen_url}/v1/chat/completions"
        return measure(Target("one host", url, cluster.headers), requests)


def split(
    logs: Path, ways: int, requests: int, shaped: bool, netem: bool, settings: bool
) -> tuple[list[Figures], dict[str, Figures]]:
    """rbee's split over `ways` machines and the raw engine at its placement, both loaded at
    once and measured in turns (and with `settings`, the engine's settings varied: RPC server
    threads and wait, tensor cache). Returns the rows and, by row name, the raw engine's
    figures measured beside it."""
    boxes = [f"box{i}" for i in range(1, ways + 1)]
    with netns.Lan(["queen", *boxes]) as lan, shaping(lan, shaped, netem):
        cluster = LanCluster(lan, logs / f"split{ways}")
        cluster.logs.mkdir(parents=True, exist_ok=True)
        cluster.start_queen(*QUEEN_FLAGS)
        for box in boxes:
            cluster.start_hive(box, 1.0, "--memory-limit", LIMITS[ways])
        url = f"{cluster.queen_url}/v1/chat/completions"
        rbee = Target(f"rbee split over {ways}", url, cluster.headers)
        rbee_load_s = first_token(rbee)

        # The same placement, raw: rbee's own command lines, environments and cores, minus rbee.
        (worker,) = [w for w in cluster.workers() if w["parts"]]
        hive_box = {cluster.hive_id(b): b for b in boxes}
        main = hive_box[worker["hive_id"]]
        (process,) = [p for p in cluster.worker_processes(main) if p["worker_id"] == worker["id"]]
        (llama,) = [
            c
            for c in psutil.Process(process["pid"]).children(recursive=True)
            if "llama-server" in c.name()
        ]
        llama_part = Part(main, llama.cmdline(), llama.environ(), llama.cpu_affinity())
        helpers = []
        for box in dict.fromkeys(hive_box[p["hive_id"]] for p in worker["parts"]):
            if box == main:
                continue
            response = httpx.get(
                f"{cluster.hive_url(box)}/v1/rpc-servers", headers=cluster.headers, timeout=10
            )
            (lent,) = response.json()["rpc_servers"]
            (engine,) = psutil.Process(lent["pid"]).children()
            helpers.append(Part(box, engine.cmdline(), engine.environ(), engine.cpu_affinity()))
        say(f"  rbee's split: main {main}, helpers {[h.box for h in helpers]}")
        say(f"  llama-server: {' '.join(llama_part.argv[1:])}")
        # rbee's own engine, reached on the worker's socket (no queen, no worker in the way):
        # what is left of rbee's cost there is the tunnels'.
        socket_path = llama_part.argv[llama_part.argv.index("--host") + 1]
        engine_row = Target(
            f"rbee engine over {ways}",
            "http://llama/v1/chat/completions",
            {"Authorization": f"Bearer {llama_part.env.get('LLAMA_API_KEY', '')}"},
            uds=socket_path if socket_path.startswith("/") else None,
        )

        raw = RawEngine(lan, llama_part, helpers)
        try:
            raw.start_rpc()
            raw_row = Target(f"raw over {ways}", raw.url, {})
            raw_load_s = raw.start_llama()
            found = interleaved([rbee, raw_row, engine_row], requests)
            against: dict[str, Figures] = {}
            rows = [
                Figures(rbee.name, rbee_load_s, *found[rbee.name]),
                Figures(raw_row.name, raw_load_s, *found[raw_row.name]),
                Figures(engine_row.name, 0.0, *found[engine_row.name]),
            ]
            if settings:
                cluster.run_job({"operation": "worker_stop", "worker_id": worker["id"]})
                more, against = engine_settings(raw, ways, requests)
                rows += more
        finally:
            raw.stop()
        against.update({rows[0].name: rows[1], rows[2].name: rows[1]})
        return rows, against


def engine_settings(
    raw: RawEngine, ways: int, requests: int
) -> tuple[list[Figures], dict[str, Figures]]:
    """The engine's settings, each against the raw engine with rbee's (`raw`, running) side by
    side: llama.cpp's default of 1 RPC server thread, and its default OpenMP wait (threads that
    spin between computations; rbee's RPC servers wait passively); then reloads (a llama-server
    restart, RPC servers kept) without and with the tensor cache `-c`. Returns the rows and, by
    row, the figures of rbee's settings measured beside it."""
    rows, beside = [], {}
    default = Target(f"raw over {ways}", raw.url, {})
    variants: dict[str, dict[str, Any]] = {
        f"raw {ways}, rpc -t 1": {"threads": 1},
        f"raw {ways}, rpc spin wait": {"wait": SPIN},
    }
    for name, flags in variants.items():
        other = RawEngine(raw.lan, raw.llama_part, raw.helpers, offset=1)
        try:
            other.start_rpc(**flags)
            load_s = other.start_llama()
            found = interleaved([default, Target(name, other.url, {})], requests)
        finally:
            other.stop()
        rows.append(Figures(name, load_s, *found[name]))
        beside[name] = Figures(default.name, 0.0, *found[default.name])
    raw.start_llama()
    rows.append(Figures(f"raw {ways}, reload", raw.start_llama()))
    say(f"  raw {ways}, reload: {rows[-1].load_s:.1f}s")
    cache = Path(tempfile.mkdtemp(prefix="split-bench-cache-"))
    try:
        raw.start_rpc(cache_dir=cache)
        rows.append(Figures(f"raw {ways}, -c first load", raw.start_llama()))
        rows.append(Figures(f"raw {ways}, -c reload", raw.start_llama()))
        say(f"  raw {ways}, -c: first load {rows[-2].load_s:.1f}s, reload {rows[-1].load_s:.1f}s")
    finally:
        raw.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return rows, beside


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(rows: list[Figures], base: Figures, raws: dict[str, Figures]) -> None:
    print(f"{'':24} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13} "
          f"{'x one host (p/d)':>17} {'x raw (p/d)':>12} {'>=0.9x raw':>11}")  # fmt: skip
    for f in rows:
        vs_one = f"{ratio(f.prompt_tps, base.prompt_tps)}/{ratio(f.decode_tps, base.decode_tps)}"
        raw = raws.get(f.name)
        vs_raw = verdict = "-"
        if raw is not None and f.prompt_tps and f.decode_tps:
            vs_raw = f"{ratio(f.prompt_tps, raw.prompt_tps)}/{ratio(f.decode_tps, raw.decode_tps)}"
            met = [
                (x or 0) >= 0.9 * (y or 0)
                for x, y in ((f.prompt_tps, raw.prompt_tps), (f.decode_tps, raw.decode_tps))
            ]
            verdict = ("met" if all(met) else "missed") if f.name.startswith("rbee") else "-"
        prompt = "-" if f.prompt_tps is None else f"{f.prompt_tps:.0f}"
        decode = "-" if f.decode_tps is None else f"{f.decode_tps:.1f}"
        if f.prompt_tps is None:
            vs_one = "-"
        print(f"{f.name:24} {f.load_s:7.1f} {prompt:>13} {decode:>13} "
              f"{vs_one:>17} {vs_raw:>12} {verdict:>11}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", default="2,3", help="split over these many hives (2,3)")
    parser.add_argument("--requests", type=int, default=3, help="measured requests per setup")
    parser.add_argument("--lan", default="bare,home", help="bare, home (1 ms, 1 Gbit/s)")
    parser.add_argument("--home-lan", action="store_true", help="the home-LAN run only")
    parser.add_argument(
        "--settings",
        action="store_true",
        help="also the engine's settings: rpc-server -t 1, reloads without and with -c",
    )
    args = parser.parse_args()
    if (reason := netns.unavailable_reason()) is not None:
        sys.exit(f"split_bench: {reason}")
    # Stopped with SIGTERM: leave through the LAN's cleanup (namespaces, daemons, workers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("RBEE_WORKER_WAIT_POLICY", "passive")
    ways = [int(w) for w in args.ways.split(",")]
    lans = ["home"] if args.home_lan else args.lan.split(",")
    netem = "home" in lans and has_netem()
    logs = Path(tempfile.mkdtemp(prefix="split-bench-"))
    say(f"split_bench: logs in {logs}")
    for lan_kind in lans:
        shaped = lan_kind == "home"
        how = ""
        if shaped:
            how = (
                " (tc netem delay 1ms rate 1gbit)"
                if netem
                else " (no netem in this kernel: tc tbf rate 1gbit, and split_bench's relay "
                "holding every frame a machine sends for 1 ms)"
            )
        say(f"{lan_kind} LAN{how}:")
        base = one_host(logs / lan_kind, args.requests, shaped, netem)
        rows, raws = [base], {}
        for i, n in enumerate(ways):
            more, against = split(
                logs / lan_kind, n, args.requests, shaped, netem, args.settings and i == 0
            )
            rows += more
            raws.update(against)
        print(f"\n{lan_kind} LAN{how}, SmolLM2 135M Q4_1, {args.requests} requests each "
              "(medians):")  # fmt: skip
        table(rows, base, raws)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
