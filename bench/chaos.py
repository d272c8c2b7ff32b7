"""Chaos: steady load through the queen while workers die, a hive stops and cables are cut.

    sudo .venv/bin/python bench/chaos.py [--seconds 120] [--clients 4] [--seed 1]

A queen and two hives on three network namespaces (needs root and iproute2), a SmolLM2 worker
on each hive. Client threads send short chat requests (half of them streamed) without pause;
every few seconds a fault is picked at random: SIGKILL a worker, stop a hive (started again a
while later), or cut a machine's link (restored a while later). One machine at most is cut off
or without its hive at a time; workers are killed anywhere, any time. Prints what the clients saw:

- failed before their first byte: any answer that was not a 200, or no answer (target 0)
- streams cut with an error event: streams that had started and ended with one
- longest wait: the longest any request waited for its first byte

Faults stop `--settle` seconds before the end, so the last requests show the cluster recover.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing import netns
from rbee_testing.lan_cluster import LanCluster

BOXES = ("box1", "box2")
QUEEN_FLAGS = (
    "--heartbeat-timeout", "5",
    "--cleanup-interval", "1",
    "--cooldown", "5",
    "--queue-size", "64",
    "--queue-timeout", "90",
)  # fmt: skip


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    succeeded: int = 0
    failed_before_first_byte: int = 0
    streams_cut: int = 0
    waits: list[float] = field(default_factory=list)
    longest: tuple[float, float] = (0.0, 0.0)  # (wait, when it was sent, on the run's clock)
    failures: list[str] = field(default_factory=list)

    def record(
        self, outcome: str, wait_s: float | None, detail: str = "", sent_at: float = 0.0
    ) -> None:
        with self.lock:
            self.sent += 1
            if wait_s is not None:
                self.waits.append(wait_s)
                self.longest = max(self.longest, (wait_s, sent_at))
            if outcome == "ok":
                self.succeeded += 1
            elif outcome == "cut":
                self.streams_cut += 1
            else:
                self.failed_before_first_byte += 1
                self.failures.append(detail)


def one_request(client: httpx.Client, stream: bool, tally: Tally, run_start: float) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Name a colour and a fruit."}],
        "max_tokens": 24,
        "stream": stream,
    }
    started = time.monotonic()
    at = started - run_start
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            wait_s = time.monotonic() - started
            if response.status_code != 200:
                text = response.read().decode(errors="replace")[:160]
                tally.record("failed", wait_s, f"HTTP {response.status_code}: {text}", at)
                return
            if not stream:
                response.read()
                tally.record("ok", wait_s, sent_at=at)
                return
            last = ""
            for line in response.iter_lines():
                if line.startswith("data:"):
                    last = line.removeprefix("data:").strip()
            cut = last.startswith("{") and "error" in json.loads(last)
            tally.record("cut" if cut else "ok", wait_s, sent_at=at)
    except httpx.HTTPError as exc:
        tally.record("failed", None, f"{type(exc).__name__}: {exc}")


def client_loop(
    cluster: LanCluster, tally: Tally, stop: threading.Event, seed: int, run_start: float
) -> None:
    rng = random.Random(seed)
    with cluster.client(timeout_s=300) as client:
        while not stop.is_set():
            one_request(client, rng.random() < 0.5, tally, run_start)


class Chaos:
    def __init__(self, cluster: LanCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.log: list[str] = []
        self.started = time.monotonic()
        # (when, what) to undo later: restore a link, start a hive again.
        self.pending: list[tuple[float, str, str]] = []

    def say(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s  {what}"
        self.log.append(line)
        print(line, flush=True)

    def undo_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for item in [p for p in self.pending if force or p[0] <= now]:
            self.pending.remove(item)
            _, action, box = item
            if action == "restore":
                self.cluster.lan.restore(box)
                self.say(f"restore {box}'s link")
            else:
                self.cluster.start_hive(box)
                self.say(f"start {box}'s hive again")

    def strike(self) -> None:
        # One machine impaired at a time: with every machine gone nothing could serve.
        action = self.rng.choice(["kill", "kill", "stop_hive", "cut"])
        if action == "kill":
            self.kill_worker(self.rng.choice(BOXES))
            return
        if self.pending:
            return
        box = self.rng.choice(BOXES)
        if action == "stop_hive":
            proc = self.cluster.procs[box]
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            self.pending.append((time.monotonic() + self.rng.uniform(5, 15), "start", box))
            self.say(f"stop {box}'s hive")
        else:
            self.cluster.lan.cut(box)
            self.pending.append((time.monotonic() + self.rng.uniform(8, 20), "restore", box))
            self.say(f"cut {box}'s link")

    def kill_worker(self, box: str) -> None:
        hive_id = self.cluster.hive_id(box)
        try:
            response = httpx.get(
                f"{self.cluster.hive_url(box)}/v1/workers", headers=self.cluster.headers, timeout=3
            )
            processes = response.json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            self.say(f"kill: {hive_id} does not answer; nothing killed")
            return
        if not processes:
            self.say(f"kill: no worker on {box}")
            return
        victim = self.rng.choice(processes)
        os.kill(victim["pid"], signal.SIGKILL)
        self.say(f"SIGKILL worker {victim['worker_id']}")


def run(seconds: float, clients: int, seed: int, settle_s: float) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    logs = Path(tempfile.mkdtemp(prefix="rbee-chaos-"))
    print(f"daemon logs in {logs}", flush=True)
    with netns.Lan(["queen", *BOXES]) as lan:
        cluster = LanCluster(lan, logs)
        cluster.start_queen(*QUEEN_FLAGS)
        for box in BOXES:
            cluster.start_hive(box)
            cluster.spawn_worker(box, slots=2)
        stop = threading.Event()
        chaos = Chaos(cluster, rng)
        threads = [
            threading.Thread(
                target=client_loop, args=(cluster, tally, stop, seed * 100 + i, chaos.started)
            )
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        chaos.say(f"load: {clients} clients; faults until {seconds - settle_s:.0f}s")
        end = time.monotonic() + seconds
        next_strike = time.monotonic() + rng.uniform(3, 8)
        while time.monotonic() < end:
            chaos.undo_due()
            if time.monotonic() >= next_strike and end - time.monotonic() > settle_s:
                chaos.strike()
                next_strike = time.monotonic() + rng.uniform(6, 14)
            if end - time.monotonic() <= settle_s:
                chaos.undo_due(force=True)
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(300)
        workers = cluster.workers()
        print(f"workers at the end: {[(w['id'], w['online']) for w in workers]}")
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=20.0, help="fault-free seconds at the end")
    args = parser.parse_args()
    if reason := netns.unavailable_reason():
        sys.exit(f"chaos: {reason}")
    # The three "machines" share this host's cores: workers that spin while idle (right for a
    # machine of their own) would starve each other here and stall for seconds.
    os.environ.setdefault("RBEE_WORKER_WAIT_POLICY", "passive")
    tally = run(args.seconds, args.clients, args.seed, args.settle)
    waits = sorted(tally.waits)
    print()
    print(f"requests sent                    {tally.sent}")
    print(f"succeeded                        {tally.succeeded}")
    print(f"failed before their first byte   {tally.failed_before_first_byte}   (target 0)")
    print(f"streams cut with an error event  {tally.streams_cut}")
    if waits:
        p50 = statistics.median(waits)
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
        print(f"wait for first byte              median {p50:.2f}s  p99 {p99:.2f}s")
        wait_s, sent_at = tally.longest
        print(f"longest wait for a first byte    {wait_s:.1f}s (sent at {sent_at:.1f}s)")
    for failure in tally.failures[:10]:
        print(f"  failed: {failure}")


if __name__ == "__main__":
    main()
