"""`--device cuda:0` on this CPU-only machine: refused at once with one line that says why, by the
worker, by the hive's spawn API and by `rbee worker spawn` — never a worker computing on the CPU
while it reports a GPU."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee.common.gpu import build_gpu_backend, device_problem, nvidia_gpu_count, parse_device
from rbee_testing.processes import console_script, free_port

from .conftest import Daemon, HiveStarter

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def no_usable_gpu() -> str:
    """What this machine lacks for cuda:0; the tests are about a machine that cannot use it."""
    gpus, reason = nvidia_gpu_count()
    problem = device_problem(
        parse_device("cuda:0"), build_gpu=build_gpu_backend(), cuda_gpus=gpus, no_gpu_reason=reason
    )
    if problem is None:
        pytest.skip("this machine can run workers on cuda:0 (see bench/gpu_check.sh)")
    return problem


def registered_workers(queen: Daemon) -> list[str]:
    workers = httpx.get(f"{queen.url}/v1/workers", timeout=10).json()["workers"]
    return [w["id"] for w in workers]


def test_the_worker_exits_at_once_with_one_line(queen: Daemon, no_usable_gpu: str) -> None:
    port = free_port()
    args = [
        console_script("llm-worker-rbee"),
        *("--model", DEFAULT_MODEL, "--port", str(port), "--queen-url", queen.url),
        *("--worker-id", "gpu-doomed", "--device", "cuda:0"),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"llm-worker-rbee: error: --device cuda:0: {no_usable_gpu}\n"
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in done.stderr or "NVIDIA GPU" in done.stderr
    assert registered_workers(queen) == []  # it never said `starting`: nothing was loaded


def test_the_hive_spawn_api_answers_400_and_starts_nothing(
    queen: Daemon, start_hive: HiveStarter, no_usable_gpu: str
) -> None:
    hive = start_hive()
    response = httpx.post(
        f"{hive.url}/v1/workers/spawn",
        json={"model": DEFAULT_MODEL, "device": "cuda:0"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "device_unavailable"
    assert error["message"] == (
        f"hive {hive.hive_id} cannot start a worker on cuda:0 (it can on cpu:0): {no_usable_gpu}"
    )
    assert httpx.get(f"{hive.url}/v1/workers", timeout=10).json()["workers"] == []
    assert httpx.get(f"{hive.url}/health", timeout=10).status_code == 200


def test_rbee_worker_spawn_says_why_in_one_line(
    queen: Daemon, start_hive: HiveStarter, no_usable_gpu: str
) -> None:
    hive = start_hive()
    deadline = time.monotonic() + 30
    while not httpx.get(f"{queen.url}/v1/hives", timeout=10).json()["hives"]:
        assert time.monotonic() < deadline, "the hive never reached the queen"
        time.sleep(0.2)
    rbee = [console_script("rbee"), "--queen-url", queen.url, "worker", "spawn"]
    done = subprocess.run(
        [*rbee, "-m", DEFAULT_MODEL, "--device", "cuda:0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[-1].endswith(
        f"cannot start a worker on cuda:0 (it can on cpu:0): {no_usable_gpu}"
    )
    assert f"hive {hive.hive_id}" in errors[-1]
    assert "Traceback" not in done.stderr
    assert registered_workers(queen) == []
