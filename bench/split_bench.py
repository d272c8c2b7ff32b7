"""One model split over several machines (issue 24): rbee's split against one host and against
llama.cpp's own RPC setup on the same placement.

    sudo .venv/bin/python bench/split_bench.py [--ways 2,3] [--requests 3] [--lan bare,home]

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
/health answers (raw, RPC servers already up). `--lan home` sets `tc netem delay 1ms rate 1gbit`
on every machine's link (a home LAN) before anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
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

# SmolLM2 at 2048 tokens x 1 slot: ~269 MiB on one device; a split device needs ~137 MiB of
# compute buffer and slack, and the model's 144 MiB of weights and KV cache are shared out.
LIMITS = {2: "230MiB", 3: "197MiB"}
# Every layout's worker gets the same context and slots (so the same KV cache type, f16).
QUEEN_FLAGS = (
    "--split-across-hives",
    *("--ctx-size", "2048", "--slots", "1"),
    *("--queue-timeout", "600", "--keep-alive", "-1"),
)
RAW_LLAMA_PORT = 18600
RAW_RPC_PORT = 18650
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
    prompt_tps: float
    decode_tps: float


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed_chat(
    url: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[float, float, int, int]:
    """(seconds to the first token, seconds from it to the last, prompt tokens, tokens out)."""
    started = time.monotonic()
    first = last = 0.0
    prompt_tokens = completion_tokens = chunks = 0
    with (
        httpx.Client(timeout=900) as client,
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


def measure(
    name: str, url: str, headers: dict[str, str], requests: int, load_s: float | None
) -> Figures:
    """`load_s` None: the first request's wait is the load time (an on-demand start)."""
    first_token_s, _, _, _ = timed_chat(url, headers, {**CHAT, "max_tokens": 1})
    prompt, decode = [], []
    for n in range(requests):
        # A prompt of its own each time: llama.cpp would serve a repeated one from its cache.
        (message,) = CHAT["messages"]
        body = {**CHAT, "messages": [{**message, "content": f"Run {n}. {message['content']}"}]}
        ttft, rest, prompt_tokens, out = timed_chat(url, headers, body)
        prompt.append(prompt_tokens / ttft)
        decode.append((out - 1) / rest if rest > 0 else 0.0)
    figures = Figures(
        name,
        first_token_s if load_s is None else load_s,
        statistics.median(prompt),
        statistics.median(decode),
    )
    say(
        f"  {name}: load {figures.load_s:.1f}s, prompt {figures.prompt_tps:.0f} tok/s, "
        f"decode {figures.decode_tps:.1f} tok/s"
    )
    return figures


class NoNetem(Exception):
    """This kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): no home LAN to emulate."""


def home_lan(lan: netns.Lan, hosts: list[str]) -> None:
    for host in hosts:
        argv = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
        done = lan.run(host, [*argv, "rate", "1gbit"], check=False)
        if done.returncode != 0:
            raise NoNetem(f"tc netem: {done.stderr.strip()}")


def one_host(logs: Path, requests: int, shaped: bool) -> Figures:
    with netns.Lan(["queen", "box1"]) as lan:
        if shaped:
            home_lan(lan, ["queen", "box1"])
        cluster = LanCluster(lan, logs / "one")
        cluster.logs.mkdir(parents=True, exist_ok=True)
        cluster.start_queen(*QUEEN_FLAGS)
        cluster.start_hive("box1")
        url = f"{cluster.queen_url}/v1/chat/completions"
        return measure("one host", url, cluster.headers, requests, None)


def split(logs: Path, ways: int, requests: int, shaped: bool) -> tuple[Figures, Figures]:
    boxes = [f"box{i}" for i in range(1, ways + 1)]
    with netns.Lan(["queen", *boxes]) as lan:
        if shaped:
            home_lan(lan, ["queen", *boxes])
        cluster = LanCluster(lan, logs / f"split{ways}")
        cluster.logs.mkdir(parents=True, exist_ok=True)
        cluster.start_queen(*QUEEN_FLAGS)
        for box in boxes:
            cluster.start_hive(box, 1.0, "--memory-limit", LIMITS[ways])
        url = f"{cluster.queen_url}/v1/chat/completions"
        rbee = measure(f"rbee split over {ways}", url, cluster.headers, requests, None)

        # The same placement, raw: rbee's own command lines, minus rbee.
        (worker,) = [w for w in cluster.workers() if w["parts"]]
        hive_box = {cluster.hive_id(b): b for b in boxes}
        main = hive_box[worker["hive_id"]]
        (process,) = [p for p in cluster.worker_processes(main) if p["worker_id"] == worker["id"]]
        (llama,) = [
            c
            for c in psutil.Process(process["pid"]).children(recursive=True)
            if "llama-server" in c.name()
        ]
        llama_argv, llama_env = llama.cmdline(), llama.environ()
        helpers = []
        for box in dict.fromkeys(hive_box[p["hive_id"]] for p in worker["parts"]):
            if box == main:
                continue
            response = httpx.get(
                f"{cluster.hive_url(box)}/v1/rpc-servers", headers=cluster.headers, timeout=10
            )
            (lent,) = response.json()["rpc_servers"]
            (engine,) = psutil.Process(lent["pid"]).children()
            helpers.append((box, engine.cmdline(), engine.environ()))
        say(f"  rbee's split: main {main}, helpers {[b for b, _, _ in helpers]}")
        say(f"  llama-server: {' '.join(llama_argv[1:])}")
        cluster.run_job({"operation": "worker_stop", "worker_id": worker["id"]})

        endpoints = []
        for box, rpc_argv, rpc_env in helpers:
            ip = lan.address(box)
            raw_argv = list(rpc_argv)  # rbee's flags (threads, devices), on the LAN address
            raw_argv[raw_argv.index("--host") + 1] = ip
            raw_argv[raw_argv.index("--port") + 1] = str(RAW_RPC_PORT)
            env = {k: v for k, v in rpc_env.items() if not k.startswith("RBEE_")}
            lan.popen(box, raw_argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            endpoints.append(f"{ip}:{RAW_RPC_PORT}")
        for endpoint in endpoints:
            ip, port = endpoint.split(":")
            wait_listening(lan, main, ip, int(port))
        argv = list(llama_argv)
        argv[argv.index("--host") + 1] = lan.address(main)
        argv[argv.index("--rpc") + 1] = ",".join(endpoints)
        argv += ["--port", str(RAW_LLAMA_PORT)]
        env = {k: v for k, v in llama_env.items() if k != "LLAMA_API_KEY" and "RBEE" not in k}
        began = time.monotonic()
        lan.popen(main, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://{lan.address(main)}:{RAW_LLAMA_PORT}"
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - began > 600:
                raise RuntimeError("raw llama-server did not come up in 600 s")
            time.sleep(0.1)
        load_s = time.monotonic() - began
        raw = measure(f"raw over {ways}", f"{base}/v1/chat/completions", {}, requests, load_s)
        return rbee, raw


def wait_listening(lan: netns.Lan, box: str, ip: str, port: int) -> None:
    code = (
        "import socket,time\n"
        "for _ in range(600):\n"
        f"    try: socket.create_connection(({ip!r}, {port}), 1).close(); break\n"
        "    except OSError: time.sleep(0.1)\n"
    )
    lan.run(box, [sys.executable, "-c", code], timeout=120)


def table(rows: list[Figures], base: Figures, raws: dict[str, Figures]) -> None:
    print(f"{'':24} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13} "
          f"{'x one host (p/d)':>17} {'x raw (p/d)':>12}")  # fmt: skip
    for f in rows:
        vs_one = f"{f.prompt_tps / base.prompt_tps:.2f}/{f.decode_tps / base.decode_tps:.2f}"
        raw = raws.get(f.name)
        vs_raw = (
            f"{f.prompt_tps / raw.prompt_tps:.2f}/{f.decode_tps / raw.decode_tps:.2f}"
            if raw
            else "-"
        )
        print(f"{f.name:24} {f.load_s:7.1f} {f.prompt_tps:13.0f} {f.decode_tps:13.1f} "
              f"{vs_one:>17} {vs_raw:>12}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", default="2,3", help="split over these many hives (2,3)")
    parser.add_argument("--requests", type=int, default=3, help="measured requests per setup")
    parser.add_argument("--lan", default="bare,home", help="bare, home (netem 1ms 1gbit)")
    args = parser.parse_args()
    if (reason := netns.unavailable_reason()) is not None:
        sys.exit(f"split_bench: {reason}")
    # Stopped with SIGTERM: leave through the LAN's cleanup (namespaces, daemons, workers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("RBEE_WORKER_WAIT_POLICY", "passive")
    ways = [int(w) for w in args.ways.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="split-bench-"))
    say(f"split_bench: logs in {logs}")
    for lan_kind in args.lan.split(","):
        shaped = lan_kind == "home"
        say(f"{lan_kind} LAN{' (netem delay 1ms rate 1gbit)' if shaped else ''}:")
        try:
            base = one_host(logs / lan_kind, args.requests, shaped)
        except NoNetem as exc:
            print(f"\n{lan_kind} LAN: skipped, {exc} (this kernel has no netem)")
            continue
        rows, raws = [base], {}
        for n in ways:
            rbee, raw = split(logs / lan_kind, n, args.requests, shaped)
            rows += [rbee, raw]
            raws[rbee.name] = raw
        print(f"\n{lan_kind} LAN{' (netem delay 1ms rate 1gbit)' if shaped else ''}, SmolLM2 "
              f"135M Q4_1, {args.requests} requests each (medians):")  # fmt: skip
        table(rows, base, raws)


if __name__ == "__main__":
    main()
