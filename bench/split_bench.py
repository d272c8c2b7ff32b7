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
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    prompt_tps: float | None = None  # None: a row of load time only
    decode_tps: float | None = None


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
        f"  {name}: load {figures.load_s:.1f}s, prompt {statistics.median(prompt):.0f} tok/s, "
        f"decode {statistics.median(decode):.1f} tok/s"
    )
    return figures


DELAY_S = 0.001  # a home LAN's one-way delay
# Turn a link's transmit checksum offload off (ethtool -K DEV tx off, without ethtool).
NO_OFFLOAD = """
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", 0x17, 0))  # ETHTOOL_STXCSUM, off
request = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value))
sock = socket.socket()
fcntl.ioctl(sock.fileno(), 0x8946, request)  # SIOCETHTOOL
"""
RELAY_FLAG = "--relay"


def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (CONFIG_NET_SCH_NETEM), tried on a dummy link."""
    with netns.Lan(["probe"]) as lan:
        argv = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
        return bool(lan.run("probe", [*argv, "rate", "1gbit"], check=False).returncode == 0)


@contextlib.contextmanager
def home_lan(lan: netns.Lan, hosts: list[str], netem: bool) -> Iterator[None]:
    """1 ms one-way and 1 Gbit/s on every machine's link: netem, or tbf and the relay."""
    if netem:
        for host in hosts:
            argv = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
            lan.run(host, [*argv, "rate", "1gbit"])
        yield
        return
    relays = []
    try:
        for n, host in enumerate(hosts):
            tbf = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1gbit"]
            lan.run(host, [*tbf, "burst", "32kbit", "latency", "400ms"])
            # Frames with their checksums filled in and one segment each, which a raw socket
            # can pass on (a veth leaves checksums to the receiver and sends 64 kB frames).
            lan.run(host, [sys.executable, "-c", NO_OFFLOAD, "eth0"])
            lan.run(host, ["ip", "link", "set", "eth0", "gso_max_segs", "1"])
            relays.append(start_relay(lan, lan.hosts.index(host), n))
        subprocess.run([sys.executable, "-c", NO_OFFLOAD, f"{lan.prefix}gw"], check=True)
        yield
    finally:
        for relay in relays:
            relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(10)
            if relay.poll() is None:
                relay.kill()
                relay.wait()


def start_relay(lan: netns.Lan, index: int, n: int) -> subprocess.Popen[bytes]:
    """Put the relay between machine `index`'s switch port and the switch's bridge."""
    port, near, far = f"p{index}", f"r{n}a", f"r{n}b"

    def switch(*args: str) -> None:
        subprocess.run(["ip", "-n", lan.switch, *args], check=True, capture_output=True)

    switch("link", "set", port, "nomaster")
    switch("link", "add", near, "type", "veth", "peer", "name", far)
    for link in (port, near, far):
        switch("link", "set", link, "gso_max_segs", "1")
    switch("link", "set", far, "master", "br0", "up")
    switch("link", "set", near, "up")
    argv = ["ip", "netns", "exec", lan.switch, sys.executable, __file__, RELAY_FLAG, port, near]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def relay(from_host: str, to_switch: str) -> None:
    """Frames the machine sends (they arrive on its switch port) go on to the bridge DELAY_S
    later; frames for it pass at once. Bench only: the product never delays anything."""
    eth_all = 3  # ETH_P_ALL
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_all))
    host.bind((from_host, 0))
    bridge = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_all))
    bridge.bind((to_switch, 0))
    outgoing = 4  # PACKET_OUTGOING: what this relay itself sent on that link
    held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def take() -> None:
        while True:
            frame, address = host.recvfrom(65535)
            if address[2] != outgoing:
                held.put((time.monotonic() + DELAY_S, frame))

    def release() -> None:
        while True:
            due, frame = held.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):
                bridge.send(frame)

    def back() -> None:
        while True:
            frame, address = bridge.recvfrom(65535)
            if address[2] != outgoing:
                with contextlib.suppress(OSError):
                    host.send(frame)

    for target in (take, release, back):
        threading.Thread(target=target, daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def shaping(lan: netns.Lan, shaped: bool, netem: bool) -> contextlib.AbstractContextManager[None]:
    return home_lan(lan, list(lan.hosts), netem) if shaped else contextlib.nullcontext()


def one_host(logs: Path, requests: int, shaped: bool, netem: bool) -> Figures:
    with netns.Lan(["queen", "box1"]) as lan, shaping(lan, shaped, netem):
        cluster = LanCluster(lan, logs / "one")
        cluster.logs.mkdir(parents=True, exist_ok=True)
        cluster.start_queen(*QUEEN_FLAGS)
        cluster.start_hive("box1")
        url = f"{cluster.queen_url}/v1/chat/completions"
        return measure("one host", url, cluster.headers, requests, None)


def split(
    logs: Path, ways: int, requests: int, shaped: bool, netem: bool, settings: bool
) -> list[Figures]:
    """rbee's split over `ways` machines, then the raw engine at its placement (and with
    `settings`, the engine's settings varied: RPC server threads, tensor cache)."""
    boxes = [f"box{i}" for i in range(1, ways + 1)]
    with netns.Lan(["queen", *boxes]) as lan, shaping(lan, shaped, netem):
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

        raw = RawEngine(lan, main, llama_argv, llama_env, helpers)
        try:
            raw.start_rpc()
            load_s = raw.start_llama()
            base = raw.url
            rows = [rbee, measure(f"raw over {ways}", base, {}, requests, load_s)]
            if settings:
                rows += engine_settings(raw, ways, requests)
        finally:
            raw.stop()
        return rows


class RawEngine:
    """llama.cpp's own split at rbee's placement: `ggml-rpc-server`s on the helpers' LAN
    addresses and `llama-server --rpc` at them, with rbee's command lines (flags can vary)."""

    def __init__(
        self,
        lan: netns.Lan,
        main: str,
        llama_argv: list[str],
        llama_env: dict[str, str],
        helpers: list[tuple[str, list[str], dict[str, str]]],
    ) -> None:
        self.lan, self.main = lan, main
        self.llama_argv, self.llama_env, self.helpers = llama_argv, llama_env, helpers
        self.rpcs: list[subprocess.Popen[bytes]] = []
        self.llama: subprocess.Popen[bytes] | None = None
        self.endpoints: list[str] = []
        self.url = f"http://{lan.address(main)}:{RAW_LLAMA_PORT}/v1/chat/completions"

    def start_rpc(self, threads: int | None = None, cache_dir: Path | None = None) -> None:
        """rbee's rpc-server flags; `threads`: another `-t`; `cache_dir`: with `-c` there."""
        self.stop()
        self.endpoints = []
        for box, rpc_argv, rpc_env in self.helpers:
            ip = self.lan.address(box)
            argv = list(rpc_argv)  # rbee's flags (threads, devices), on the LAN address
            argv[argv.index("--host") + 1] = ip
            argv[argv.index("--port") + 1] = str(RAW_RPC_PORT)
            if threads is not None:
                argv[argv.index("--threads") + 1] = str(threads)
            env = {k: v for k, v in rpc_env.items() if not k.startswith("RBEE_")}
            if cache_dir is not None:
                argv.append("--cache")
                env["LLAMA_CACHE"] = str(cache_dir / box)  # cold at first: a fresh directory
            say(f"  raw rpc-server on {box}: {' '.join(argv[1:])}")
            self.rpcs.append(
                self.lan.popen(
                    box, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
            self.endpoints.append(f"{ip}:{RAW_RPC_PORT}")
        for endpoint in self.endpoints:
            ip, port = endpoint.split(":")
            wait_listening(self.lan, self.main, ip, int(port))

    def start_llama(self) -> float:
        """Start llama-server at the RPC servers; returns its load time (until /health)."""
        self.stop_llama()
        argv = list(self.llama_argv)
        argv[argv.index("--host") + 1] = self.lan.address(self.main)
        argv[argv.index("--rpc") + 1] = ",".join(self.endpoints)
        argv += ["--port", str(RAW_LLAMA_PORT)]
        env = {k: v for k, v in self.llama_env.items() if k != "LLAMA_API_KEY" and "RBEE" not in k}
        began = time.monotonic()
        self.llama = self.lan.popen(
            self.main, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        base = f"http://{self.lan.address(self.main)}:{RAW_LLAMA_PORT}"
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.llama.poll() is not None:
                raise RuntimeError(f"raw llama-server exited ({self.llama.returncode})")
            if time.monotonic() - began > 600:
                raise RuntimeError("raw llama-server did not come up in 600 s")
            time.sleep(0.05)
        return time.monotonic() - began

    def stop_llama(self) -> None:
        if self.llama is not None:
            stop_process(self.llama)
            self.llama = None

    def stop(self) -> None:
        self.stop_llama()
        for proc in self.rpcs:
            stop_process(proc)
        self.rpcs = []


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def engine_settings(raw: RawEngine, ways: int, requests: int) -> list[Figures]:
    """The raw engine with llama.cpp's default of 1 RPC server thread, then reloads (a
    llama-server restart, RPC servers kept) without and with the tensor cache `-c`."""
    rows = []
    raw.start_rpc(threads=1)
    load_s = raw.start_llama()
    rows.append(measure(f"raw {ways}, rpc -t 1", raw.url, {}, requests, load_s))
    raw.start_rpc()
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
    return rows


def wait_listening(lan: netns.Lan, box: str, ip: str, port: int) -> None:
    code = (
        "import socket,time\n"
        "for _ in range(600):\n"
        f"    try: socket.create_connection(({ip!r}, {port}), 1).close(); break\n"
        "    except OSError: time.sleep(0.1)\n"
    )
    lan.run(box, [sys.executable, "-c", code], timeout=120)


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
            verdict = "met" if all(met) else "missed"
        prompt = "-" if f.prompt_tps is None else f"{f.prompt_tps:.0f}"
        decode = "-" if f.decode_tps is None else f"{f.decode_tps:.1f}"
        if f.prompt_tps is None:
            vs_one = "-"
        print(f"{f.name:24} {f.load_s:7.1f} {prompt:>13} {decode:>13} "
              f"{vs_one:>17} {vs_raw:>12} {verdict:>11}")  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == RELAY_FLAG:
        relay(sys.argv[2], sys.argv[3])
        return
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
            rbee, raw, *more = split(
                logs / lan_kind, n, args.requests, shaped, netem, args.settings and i == 0
            )
            rows += [rbee, raw, *more]
            raws[rbee.name] = raw
        print(f"\n{lan_kind} LAN{how}, SmolLM2 135M Q4_1, {args.requests} requests each "
              "(medians):")  # fmt: skip
        table(rows, base, raws)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
