"""split_bench's raw engine: llama.cpp's own split (`ggml-rpc-server`s and `llama-server --rpc`)
run with the command lines rbee's split ran, on the same test LAN, for a side-by-side figure.
Bench only: rbee never exposes an RPC server on the LAN.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rbee_testing import netns

RAW_LLAMA_PORT = 18600
RAW_RPC_PORT = 18650
SPIN = "spin"  # RawEngine.start_rpc(wait=SPIN): OpenMP's default wait, not rbee's passive one


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Part:
    """One process of a split as rbee ran it: where, its command line, environment and cores."""

    box: str
    argv: list[str]
    env: dict[str, str]
    cpus: list[int]


def _pinned(cpus: list[int]) -> Any:
    return lambda: os.sched_setaffinity(0, cpus)


class RawEngine:
    """llama.cpp's own split at rbee's placement: `ggml-rpc-server`s on the helpers' LAN
    addresses and `llama-server --rpc` at them, with rbee's command lines (flags can vary)."""

    def __init__(self, lan: netns.Lan, llama: Part, helpers: list[Part], offset: int = 0) -> None:
        """`offset`: added to the ports, for a second raw engine beside the first."""
        self.lan, self.main, self.llama_part, self.helpers = lan, llama.box, llama, helpers
        self.rpcs: list[subprocess.Popen[bytes]] = []
        self.llama: subprocess.Popen[bytes] | None = None
        self.endpoints: list[str] = []
        self.llama_port, self.rpc_port = RAW_LLAMA_PORT + offset, RAW_RPC_PORT + offset
        self.url = f"http://{lan.address(llama.box)}:{self.llama_port}/v1/chat/completions"

    def start_rpc(
        self, threads: int | None = None, cache_dir: Path | None = None, wait: str | None = None
    ) -> None:
        """rbee's rpc-server flags; `threads`: another `-t`; `cache_dir`: with `-c` there;
        `wait`: another OMP_WAIT_POLICY."""
        self.stop()
        self.endpoints = []
        for part in self.helpers:
            box, ip = part.box, self.lan.address(part.box)
            argv = list(part.argv)  # rbee's flags (threads, devices), on the LAN address
            argv[argv.index("--host") + 1] = ip
            argv[argv.index("--port") + 1] = str(self.rpc_port)
            if threads is not None:
                argv[argv.index("--threads") + 1] = str(threads)
            env = {k: v for k, v in part.env.items() if not k.startswith("RBEE_")}
            if cache_dir is not None:
                argv.append("--cache")
                env["LLAMA_CACHE"] = str(cache_dir / box)  # cold at first: a fresh directory
            if wait == SPIN:
                env.pop("OMP_WAIT_POLICY", None)  # llama.cpp's default: spin, then sleep
            elif wait is not None:
                env["OMP_WAIT_POLICY"] = wait
            say(f"  raw rpc-server on {box}: {' '.join(argv[1:])}")
            self.rpcs.append(
                self.lan.popen(
                    box,
                    argv,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=_pinned(part.cpus),
                )
            )
            self.endpoints.append(f"{ip}:{self.rpc_port}")
        for endpoint in self.endpoints:
            ip, port = endpoint.split(":")
            wait_listening(self.lan, self.main, ip, int(port))

    def start_llama(self) -> float:
        """Start llama-server at the RPC servers; returns its load time (until /health)."""
        self.stop_llama()
        argv = list(self.llama_part.argv)
        argv[argv.index("--host") + 1] = self.lan.address(self.main)
        argv[argv.index("--rpc") + 1] = ",".join(self.endpoints)
        argv += ["--port", str(self.llama_port)]
        env = {
            k: v for k, v in self.llama_part.env.items() if k != "LLAMA_API_KEY" and "RBEE" not in k
        }
        began = time.monotonic()
        self.llama = self.lan.popen(
            self.main,
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pinned(self.llama_part.cpus),
        )
        base = f"http://{self.lan.address(self.main)}:{self.llama_port}"
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


def wait_listening(lan: netns.Lan, box: str, ip: str, port: int) -> None:
    code = (
        "import socket,time\n"
        "for _ in range(600):\n"
        f"    try: socket.create_connection(({ip!r}, {port}), 1).close(); break\n"
        "    except OSError: time.sleep(0.1)\n"
    )
    lan.run(box, [sys.executable, "-c", code], timeout=120)
