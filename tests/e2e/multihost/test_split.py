"""One model over several machines (issue 24), for real: a queen and hives on network namespaces
of a test LAN, each hive's --memory-limit too small for SmolLM2 alone, both together enough.

The queen splits the model over two hives (llama.cpp's RPC backend behind rbee's tunnel); the
answer at temperature 0 is the one a single machine gives; a third machine reaches neither the
RPC server nor its tunnel; a killed RPC server ends its worker cleanly and the next request is
served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee.hive import rpc
from rbee_testing import netns
from rbee_testing.lan_cluster import LanCluster
from rbee_testing.processes import console_script

pytestmark = pytest.mark.e2e

if (reason := netns.unavailable_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)
if not Path(rpc.default_rpc_server()).is_absolute():
    pytest.skip("no ggml-rpc-server next to llama-server (run ./dev)", allow_module_level=True)

# SmolLM2 needs about 319 MiB at 2048 tokens on a CPU (weights, KV cache, compute, its
# processes, its prompt cache): it fits under neither limit, while two hives each lend what is
# left after their compute buffer (~137 MiB).
MEMORY_LIMIT = "230MiB"
QUEEN_FLAGS = (
    "--split-across-hives",  # the test LAN is plain HTTP: splitting is off by default there
    "--ctx-size", "2048", "--slots", "1",
    "--heartbeat-timeout", "90",  # the default: a dead split worker must not wait for it
    "--cleanup-interval", "1",
    "--queue-timeout", "120",
    "--keep-alive", "-1",
)  # fmt: skip
CHAT = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
    "max_tokens": 24,
    "temperature": 0,
}
COUNTING = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3,", "max_tokens": 2000, "temperature": 0}
HELLO = b"\x0e" + (24).to_bytes(8, "little") + bytes(24)  # llama.cpp RPC's first command


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LanCluster]:
    with netns.Lan(["queen", "box1", "box2", "box3"]) as lan:
        cluster = LanCluster(lan, tmp_path)
        cluster.start_queen(*QUEEN_FLAGS)
        cluster.start_hive("box1", 1.0, "--memory-limit", MEMORY_LIMIT)
        cluster.start_hive("box2", 1.0, "--memory-limit", MEMORY_LIMIT)
        yield cluster


def chat(cluster: LanCluster) -> tuple[int, str, dict[str, Any]]:
    with cluster.client(600) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    return response.status_code, response.headers.get("x-rbee-worker-id", ""), response.json()


def box_of(cluster: LanCluster, hive_id: str) -> str:
    return next(b for b in ("box1", "box2", "box3") if cluster.hive_id(b) == hive_id)


def rpc_servers(cluster: LanCluster, box: str) -> list[dict[str, Any]]:
    url = f"{cluster.hive_url(box)}/v1/rpc-servers"
    response = httpx.get(url, headers=cluster.headers, timeout=10)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["rpc_servers"]
    return found


def split_worker(cluster: LanCluster) -> tuple[dict[str, Any], str, str]:
    """The split worker, its main machine and its helper machine."""
    (worker,) = [w for w in cluster.workers() if w["parts"]]
    main = box_of(cluster, worker["hive_id"])
    (helper,) = {box_of(cluster, p["hive_id"]) for p in worker["parts"]} - {main}
    return worker, main, helper


def from_box(cluster: LanCluster, box: str, code: str) -> str:
    return cluster.lan.run(box, [sys.executable, "-c", code], timeout=60).stdout.strip()


def reach(host: str, port: int) -> str:
    """Python run on another machine: what a raw RPC hello to host:port gets back."""
    return f"""
import socket
try:
    s = socket.create_connection(({host!r}, {port}), timeout=5)
except OSError as exc:
    print("refused", type(exc).__name__)
else:
    s.settimeout(10)
    s.sendall({HELLO!r})
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except OSError:
        pass
    print("answered", repr(got))
"""


def rbee(cluster: LanCluster, *args: str, timeout_s: float = 60) -> str:
    env = {**os.environ, "RBEE_TOKEN": cluster.token, "RBEE_QUEEN_URL": cluster.queen_url}
    env.pop("RBEE_CLUSTER", None)
    result = subprocess.run(
        [console_script("rbee"), *args],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "250"},
        timeout=timeout_s,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def rbee_status(cluster: LanCluster) -> str:
    return rbee(cluster, "status")


def test_a_model_no_machine_holds_is_split_over_two_and_answers_as_one_machine(
    cluster: LanCluster,
) -> None:
    status, served_by, split_answer = chat(cluster)
    assert status == 200, (split_answer, cluster.output("queen"))
    worker, main, helper = split_worker(cluster)
    assert served_by == worker["id"]
    assert {p["hive_id"] for p in worker["parts"]} == {
        cluster.hive_id("box1"),
        cluster.hive_id("box2"),
    }
    shown = rbee_status(cluster)
    assert f"{cluster.hive_id(main)}+{cluster.hive_id(helper)}" in shown, shown

    # The helper's RPC server: llama.cpp's on its loopback, rbee's tunnel on its address.
    (lent,) = rpc_servers(cluster, helper)
    assert lent["worker_id"] == worker["id"]
    (engine,) = psutil.Process(lent["pid"]).children()
    argv = engine.cmdline()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    engine_port = int(argv[argv.index("--port") + 1])
    helper_ip = cluster.lan.address(helper)
    # A third machine: the RPC server's own port is not on the LAN at all ...
    assert from_box(cluster, "box3", reach(helper_ip, engine_port)).startswith("refused")
    # ... and the tunnel turns it away before a single byte reaches llama.cpp's server.
    assert from_box(cluster, "box3", reach(helper_ip, lent["port"])) == "answered b''"
    # Even with the cluster token, only the main worker's machine may use it.
    with_token = f"""
import asyncio
from rbee.common.tunnel import TunnelRefused, open_tunnel
async def main():
    try:
        await open_tunnel({helper_ip!r}, {lent["port"]}, {lent["rpc_id"]!r}, {cluster.token!r})
    except (TunnelRefused, OSError) as exc:
        print("refused", type(exc).__name__)
    else:
        print("admitted")
asyncio.run(main())
"""
    assert from_box(cluster, "box3", with_token).startswith("refused")

    # The same model on one machine (a hive with no limit) gives the same tokens.
    cluster.start_hive("box3")
    # The split worker's context and slots, so its KV cache is stored the same way (f16).
    assert (worker["ctx_size"], worker["slots"]) == (2048, 1)
    solo = cluster.run_job(
        {
            "operation": "worker_spawn",
            "model": DEFAULT_MODEL,
            "hive_id": cluster.hive_id("box3"),
            "ctx_size": 2048,
            "slots": 1,
        }
    )
    assert solo["type"] == "done", solo
    stopped = cluster.run_job({"operation": "worker_stop", "worker_id": worker["id"]})
    assert stopped["type"] == "done", stopped
    # Stopping the split worker gave the helper's memory back at once.
    assert rpc_servers(cluster, helper) == []
    status, served_by, solo_answer = chat(cluster)
    assert status == 200
    assert served_by == solo["result"]["worker_id"]
    assert (
        solo_answer["choices"][0]["message"]["content"]
        == (split_answer["choices"][0]["message"]["content"])
    )


def gone(pid: int, wait_s: float = 30.0) -> bool:
    """The process exited (or is a zombie its parent has yet to collect) within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def stream(cluster: LanCluster, started: threading.Event, out: dict[str, Any]) -> None:
    with (
        cluster.client(600) as client,
        client.stream("POST", "/v1/completions", json={**COUNTING, "stream": True}) as response,
    ):
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data:"):
                out["last"] = line.removeprefix("data:").strip()
                started.set()
    out["ended_at"] = time.monotonic()


def test_a_killed_rpc_server_ends_its_worker_cleanly_and_the_next_request_is_served(
    cluster: LanCluster,
) -> None:
    status, _, answer = chat(cluster)
    assert status == 200, f"{answer}\n{cluster.output('queen')}"
    worker, main, helper = split_worker(cluster)
    (lent,) = rpc_servers(cluster, helper)
    (engine,) = psutil.Process(lent["pid"]).children()
    (process,) = [p for p in cluster.worker_processes(main) if p["worker_id"] == worker["id"]]
    llama = psutil.Process(process["pid"]).children(recursive=True)
    assert llama, "the worker runs its llama-server"

    started, out = threading.Event(), dict[str, Any]()
    streaming = threading.Thread(target=stream, args=(cluster, started, out))
    streaming.start()
    assert started.wait(300), "the stream did not start"
    killed_at = time.monotonic()
    engine.send_signal(signal.SIGKILL)
    streaming.join(300)
    assert not streaming.is_alive(), "the stream hangs after its RPC server died"
    # An error event ends it: the worker's own (llama.cpp broke off) or the queen's.
    assert json.loads(out["last"])["error"]["code"] in ("generation_failed", "worker_failed"), out

    # The worker is gone long before the queen's 90 s heartbeat timeout would say so, and
    # nothing of it is left: its process, its llama-server, the helper's tunnel.
    cluster.wait_for(lambda: worker["id"] not in {w["id"] for w in cluster.workers()}, 60)
    print(f"split worker gone {time.monotonic() - killed_at:.1f}s after its RPC server died")
    left = [p.pid for p in [*llama, engine] if not gone(p.pid)]
    left += [pid for pid in (process["pid"], lent["pid"]) if not gone(pid)]
    assert left == [], f"left running: {left}"

    # The next request: a new split, served.
    status, served_by, answer = chat(cluster)
    assert status == 200, f"{answer}\n{cluster.output('queen')}"
    assert served_by != worker["id"]


def rbee_processes(cluster: LanCluster, box: str) -> list[str]:
    """What of a worker runs on a machine: llm-worker-rbee (its tunnels' end), llama-server,
    rpc-server (and the hive's process lending it), as `pid argv`."""
    found = []
    listed = subprocess.run(
        ["ip", "netns", "pids", cluster.lan.namespace(box)], capture_output=True, text=True
    )
    for pid in listed.stdout.split():
        try:
            process = psutil.Process(int(pid))
            argv = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, ValueError):
            continue
        if process.status() == psutil.STATUS_ZOMBIE:
            continue
        if "--standby" in process.cmdline():  # a hive's spare worker, waiting for a model
            continue
        if any(name in argv for name in ("llm-worker-rbee", "llama-server", "rpc-server")):
            found.append(f"{pid} {argv[:160]}")
    return found


@pytest.mark.timeout(900)
def test_a_cut_cable_to_the_helper_ends_the_stream_and_the_worker_and_leaves_nothing(
    cluster: LanCluster,
) -> None:
    status, _, answer = chat(cluster)
    assert status == 200, f"{answer}\n{cluster.output('queen')}"
    worker, main, helper = split_worker(cluster)

    started, out = threading.Event(), dict[str, Any]()
    streaming = threading.Thread(target=stream, args=(cluster, started, out))
    streaming.start()
    try:
        assert started.wait(300), "the stream did not start"
        cut_at = time.monotonic()
        cluster.lan.cut(helper)
        # No hang: llama.cpp would wait for the helper's answer for a quarter of an hour.
        streaming.join(120)
        assert not streaming.is_alive(), "the stream hangs after the helper's cable was cut"
        assert json.loads(out["last"])["error"]["code"] in ("generation_failed", "worker_failed"), (
            out
        )
        print(f"stream ended {out['ended_at'] - cut_at:.1f}s after the cut")
        # Gone well before the queen's 90 s heartbeat timeout: the worker itself died.
        cluster.wait_for(lambda: worker["id"] not in {w["id"] for w in cluster.workers()}, 60)
        print(f"split worker gone {time.monotonic() - cut_at:.1f}s after the cut")
        assert rbee_processes(cluster, main) == []

        # The next request: the model fits on neither machine alone and the helper is out of
        # reach (though the queen still lists it online), so it is refused with the figures.
        with cluster.client(600) as client:
            refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory", error
        assert error["needed_bytes"] > error["largest_free_bytes"] > 0, error

        # A third machine joins: the model fits again, split with it instead of the cut one.
        cluster.start_hive("box3", 1.0, "--memory-limit", MEMORY_LIMIT)
        status, served_by, answer = chat(cluster)
        assert status == 200, f"{answer}\n{cluster.output('queen')}"
        (again,) = [w for w in cluster.workers() if w["id"] == served_by]
        assert cluster.hive_id(helper) not in {p["hive_id"] for p in again["parts"]}
        stopped = cluster.run_job({"operation": "worker_stop", "worker_id": again["id"]})
        assert stopped["type"] == "done", stopped
    finally:
        cluster.lan.restore(helper)
        streaming.join(300)

    # Back on the LAN: the helper's RPC server and tunnel stopped by themselves meanwhile.
    cluster.wait_for(lambda: rpc_servers(cluster, helper) == [], 60)
    for box in ("box1", "box2", "box3"):
        cluster.wait_for(lambda box=box: rbee_processes(cluster, box) == [], 60)


def test_rbee_load_splits_a_model_no_machine_holds_and_unload_gives_the_memory_back(
    cluster: LanCluster,
) -> None:
    loaded = rbee(cluster, "load", DEFAULT_MODEL, "--keep-alive", "10m", timeout_s=600)
    worker, main, helper = split_worker(cluster)
    pair = f"{cluster.hive_id(main)}+{cluster.hive_id(helper)}"
    assert f"loaded {DEFAULT_MODEL}: worker {worker['id']} split over hives {pair}" in loaded
    assert worker["keep_alive_s"] == 600  # as asked, not pinned
    assert worker["hive_id"] == cluster.hive_id(main)
    (lent,) = rpc_servers(cluster, helper)
    assert lent["worker_id"] == worker["id"]
    # It serves, and no other worker was started for the request.
    status, served_by, _ = chat(cluster)
    assert (status, served_by) == (200, worker["id"])

    unloaded = rbee(cluster, "unload", DEFAULT_MODEL, timeout_s=120)
    assert f"stopped {worker['id']}" in unloaded
    assert rpc_servers(cluster, helper) == []
    cluster.wait_for(lambda: rbee_processes(cluster, main) == [], 60)
    cluster.wait_for(lambda: rbee_processes(cluster, helper) == [], 60)
