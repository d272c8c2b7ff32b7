"""Issue 27's first hour, followed as a newcomer types it: the real `rbee` program and real
clusters. `rbee` finds the cluster `rbee up` started (and says how to put itself on the PATH);
two clusters run side by side; `rbee infer` is bounded and tells its speed, `rbee chat` keeps the
conversation; `rbee hive stop` stops its workers; `rbee down` stops what `rbee up` started;
tokens per second are live while an answer streams; each worker keeps its own log."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbee.cli import processes
from rbee.common.bundled import DEFAULT_MODEL
from rbee.common.worker_command import SPAWN_MARKER
from rbee_testing.processes import free_port

from .conftest import RBEE, processes_mentioning

pytestmark = pytest.mark.e2e
READY_LINE = "Press Ctrl-C to stop everything."
BIN = str(Path(RBEE).parent)


def free_pair() -> int:
    """A port P free with P+2 free too (a cluster started with only --port puts its hive there)."""
    while True:
        port = free_port()
        if port <= 65533 and not processes.port_in_use("127.0.0.1", port + 2):
            return port


def wait_for(path: Path, text: str, proc: subprocess.Popen[Any], timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = path.read_text()
        if text in output:
            return output
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {text!r}:\n{output}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} after {timeout_s}s:\n{path.read_text()}")


@pytest.fixture
def user_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A newcomer's shell: `rbee` not on the PATH, a home of their own (API keys, worker logs),
    no RBEE_TOKEN or RBEE_QUEEN_URL."""
    home = tmp_path / "home"
    home.mkdir()
    return {**env, "PATH": "/usr/bin:/bin", "HOME": str(home)}


def sh(
    env: dict[str, str], script: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class Up:
    """`rbee up …` in the background, as a user leaves it running in a terminal."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [RBEE, "up", *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )

    def banner(self) -> str:
        return wait_for(self.log, READY_LINE, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


def test_help_names_the_default_model(user_env: dict[str, str]) -> None:
    result = sh(user_env, f"{RBEE} up --help")
    assert result.returncode == 0, result.stderr
    assert f"Model the workers serve (default: {DEFAULT_MODEL})" in " ".join(result.stdout.split())


def test_rbee_finds_its_clusters_two_side_by_side_and_rbee_down_stops_them(
    user_env: dict[str, str], tmp_path: Path, ups: list[Up], reaper: list[str]
) -> None:
    first_port, second_port = free_pair(), free_pair()
    first_url, second_url = f"http://127.0.0.1:{first_port}", f"http://127.0.0.1:{second_port}"
    reaper.extend([first_url, second_url])
    models = ["--models-dir", str(tmp_path / "models")]

    first = Up({**user_env, "RBEE_TOKEN": "token-one"}, tmp_path / "one.out",
               "--port", str(first_port), *models)  # fmt: skip
    ups.append(first)
    banner = first.banner()
    # `./dev up` runs .venv/bin/rbee, which is not on the PATH: the banner gives the line.
    put_on_path = f'export PATH="{BIN}:$PATH"'
    assert put_on_path in banner, banner
    assert f"rbee --cluster port-{first_port} infer" in banner

    # Another shell: no flags, no token; the cluster (its URL and its token) is found.
    status = sh(user_env, f"{put_on_path}; rbee status --json")
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["queen_url"] == first_url
    assert [w["status"] for w in found["workers"]] == ["ready"]
    answer = sh(user_env, f"{put_on_path}; rbee infer 'What is the capital of France?'")
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
    assert re.search(r"\d+ tokens? in [\d.]+ s, [\d.]+ tokens/s", answer.stderr), answer.stderr

    second = Up({**user_env, "RBEE_TOKEN": "token-two"}, tmp_path / "two.out",
                "--name", "second", "--port", str(second_port), *models)  # fmt: skip
    ups.append(second)
    assert "rbee --cluster second infer" in second.banner()

    which = sh(user_env, f"{put_on_path}; rbee status")
    assert which.returncode == 1
    assert f"several clusters are running here (port-{first_port}, second)" in which.stderr
    assert "--cluster NAME" in which.stderr
    other = sh(user_env, f"{put_on_path}; rbee --cluster second status --json")
    assert other.returncode == 0, other.stderr
    other_status = json.loads(other.stdout)
    assert other_status["queen_url"] == second_url
    # Its own hive (not the first cluster's), with its own workers only.
    assert [h["id"].endswith("-second") for h in other_status["hives"]] == [True]
    assert [w["hive_id"] for w in other_status["workers"]] == [other_status["hives"][0]["id"]]
    # Each its own key store: the same key name is free in both.
    for cluster in (f"port-{first_port}", "second"):
        made = sh(user_env, f"{put_on_path}; rbee --cluster {cluster} key create newcomer")
        assert made.returncode == 0, made.stderr

    stop_second = sh(user_env, f"{put_on_path}; rbee --cluster second down")
    assert stop_second.returncode == 0, stop_second.stderr
    assert "cluster second stopped" in stop_second.stdout
    assert second.proc.poll() == 0
    assert processes_mentioning("llm-worker-rbee", second_url) == []
    assert first.proc.poll() is None  # the other cluster still serves

    stop_first = sh(user_env, f"{put_on_path}; rbee down")  # the only one left: no flag
    assert stop_first.returncode == 0, stop_first.stderr
    assert first.proc.poll() == 0
    for url, port in ((first_url, first_port), (second_url, second_port)):
        assert processes_mentioning("llm-worker-rbee", url) == []
        assert processes_mentioning(f"--port {port}") == []
    assert "stopping 1 worker(s)" in first.log.read_text()
    assert sh(user_env, f"{put_on_path}; rbee down").stdout.startswith("no cluster")


def engines_of(hive_id: str) -> list[str]:
    """The hive's workers and their llama-servers still running: whatever carries the mark
    the hive gives what it starts (the engines inherit it from their worker)."""
    found = []
    for proc in psutil.process_iter(["environ", "cmdline"]):
        environ = proc.info["environ"] or {}
        if environ.get(SPAWN_MARKER) == hive_id and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(" ".join(proc.info["cmdline"] or [])[:80])
    return found


def test_hive_stop_stops_its_workers_unless_kept_and_each_worker_keeps_its_log(
    user_env: dict[str, str], tmp_path: Path, reaper: list[str]
) -> None:
    queen_port, hive_port, worker_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{queen_port}"
    reaper.extend([url, f"--port {hive_port}"])
    q = ["--queen-url", url]
    hive_id = f"stop-hive-{hive_port}"
    hive_args = [*q, "hive", "start", "--port", str(hive_port), "--hive-id", hive_id,
                 "--models-dir", str(tmp_path / "models"), "--heartbeat-interval", "1",
                 "--worker-ports", f"{worker_port}-{worker_port}"]  # fmt: skip
    worker_id = f"{hive_id}-{worker_port}"  # one port: a new worker takes the same id
    logs = Path(user_env["HOME"]) / ".cache" / "rbee" / "logs"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RBEE, *args], env=user_env, capture_output=True, text=True, timeout=300, check=False
        )

    try:
        assert run(*q, "queen", "start", "--port", str(queen_port)).returncode == 0
        started = run(*hive_args)
        assert started.returncode == 0, started.stderr
        spawned = run(*q, "worker", "spawn", "-m", DEFAULT_MODEL)
        assert spawned.returncode == 0, spawned.stderr
        assert f"worker {worker_id} ready" in spawned.stdout

        first_log = run(*q, "worker", "logs", worker_id)
        assert first_log.returncode == 0, first_log.stderr
        assert "llama-server" in first_log.stdout
        # A second worker with the same id: the first one's log is kept beside its own.
        assert run(*q, "worker", "stop", worker_id).returncode == 0
        again = run(*q, "worker", "spawn", "-m", DEFAULT_MODEL)
        assert again.returncode == 0, again.stderr
        assert sorted(p.name for p in logs.glob(f"worker-{worker_id}.log*")) == [
            f"worker-{worker_id}.log",
            f"worker-{worker_id}.log.1",
        ]
        assert "llama-server" in (logs / f"worker-{worker_id}.log.1").read_text()
        assert run(*q, "worker", "logs", worker_id, "-n", "3").stdout.count("\n") == 3
        unknown = run(*q, "worker", "logs", "no-such-worker")
        assert unknown.returncode == 1
        assert "no hive online has a log of worker 'no-such-worker'" in unknown.stderr

        kept = run("hive", "stop", "--port", str(hive_port), "--keep-workers")
        assert kept.returncode == 0, kept.stderr
        assert f"left 1 worker(s) running: {worker_id}" in kept.stdout
        running = engines_of(hive_id)
        assert len(running) == 2, running  # the worker and its llama-server

        assert run(*hive_args).returncode == 0  # the hive again: it finds its worker
        stopped = run("hive", "stop", "--port", str(hive_port))
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped 1 worker(s): {worker_id}" in stopped.stdout
        assert "rbee-hive stopped" in stopped.stdout
        assert run("queen", "stop").returncode == 0
        assert engines_of(hive_id) == []
        assert processes_mentioning(f"--port {queen_port}") == []
    finally:
        run("hive", "stop", "--port", str(hive_port))
        run("queen", "stop")


def generated_tokens(worker_url: str) -> float:
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "rbee_worker_generated_tokens_total"
    )


def test_chat_keeps_the_conversation_models_answer_one_by_one_and_tokens_per_second_are_live(
    user_env: dict[str, str], tmp_path: Path, ups: list[Up], reaper: list[str]
) -> None:
    port = free_pair()
    url = f"http://127.0.0.1:{port}"
    reaper.append(url)
    up = Up(user_env, tmp_path / "up.out", "--port", str(port),
            "--models-dir", str(tmp_path / "models"))  # fmt: skip
    ups.append(up)
    up.banner()

    # rbee chat, driven through its standard input: the second question needs the first.
    chat = sh(user_env, f"{RBEE} chat", stdin="My name is Zorblat.\nWhat is my name?\n/bye\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("\n") >= 2
    assert "Zorbla" in chat.stdout.splitlines()[-1], chat.stdout
    assert chat.stderr.count("tokens/s") == 2, chat.stderr
    alone = sh(user_env, f"{RBEE} infer 'What is my name?'")
    assert "Zorbla" not in alone.stdout  # it was the conversation that knew

    # GET /v1/models/{id}, as OpenAI's client retrieves a model.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"

    # A long answer streams; while it does, the worker's counter and `rbee status --watch`
    # move (before, they read 0 until a jump at its end).
    worker = json.loads(sh(user_env, f"{RBEE} status --json").stdout)["workers"][0]
    worker_url = f"http://{worker['host']}:{worker['port']}"
    watch_out = tmp_path / "watch.out"
    done, stop = threading.Event(), threading.Event()
    streamer: threading.Thread | None = None
    with watch_out.open("w") as out:
        watch = subprocess.Popen(
            [RBEE, "status", "--watch"], env=user_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(watch_out, "tokens/s", watch, timeout_s=60)  # it has a baseline now
        before = generated_tokens(worker_url)
        chunks: list[str] = []

        def stream() -> None:
            try:
                with client.chat.completions.create(
                    model=DEFAULT_MODEL,
                    messages=[
                        {
                            "role": "user",
                            "content": "Write a very long story about a dragon who learns to "
                            "fly, with many chapters.",
                        }
                    ],
                    max_tokens=3000,
                    temperature=0,
                    stream=True,
                ) as answer:
                    for chunk in answer:
                        if stop.is_set():  # seen enough: leaving stops the generation
                            break
                        if chunk.choices and chunk.choices[0].delta.content:
                            chunks.append(chunk.choices[0].delta.content)
            finally:
                done.set()

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        deadline = time.monotonic() + 120
        while len(chunks) < 20 and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        counted = generated_tokens(worker_url) - before
        still_streaming = not done.is_set()
        assert still_streaming, "the answer ended too soon to look at it while it streamed"
        assert counted >= 10, f"{counted} tokens counted after {len(chunks)} streamed"

        live = False
        while not done.is_set() and not live:
            frame = watch_out.read_text().split("req/s")[-1]
            rate = re.search(r"([\d.]+) tokens/s", frame)
            live = rate is not None and float(rate.group(1)) > 0
            time.sleep(0.2)
        assert live, "rbee status --watch never showed tokens/s above 0 while the answer ran"
    finally:
        stop.set()
        if streamer is not None:
            streamer.join(60)
        watch.terminate()
        watch.wait(30)
        client.close()
