"""The hive's standby, with a stand-in `llm-worker-rbee` that speaks the standby's real protocol
(`rbee.worker.standby.serve_orders`) and "serves" by sleeping: the workers it forks, how the hive
finds them (also after a restart), their exit codes, and what the hive never takes for one of
its workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.common.errors import NotFound
from rbee.common.worker_command import handed_flags_file
from rbee.hive.catalog import Catalog
from rbee.hive.settings import HiveSettings
from rbee.hive.standby import Forked
from rbee.hive.supervisor import SPAWN_MARKER, Supervisor
from rbee.hive.worker_launch import worker_env

HIVE_ID = f"standby-{os.getpid()}"

# "Imports" for RBEE_TEST_STANDBY_DELAY seconds, then forks a worker per order: one that writes
# what it was handed to the log it was given and runs until SIGTERM (exit 0), or exits at once
# with the code after `--exit-code`.
FAKE_STANDBY = """\
import json, os, signal, sys, time
from rbee.worker.standby import serve_orders
argv = serve_orders(lambda: time.sleep(float(os.environ.get("RBEE_TEST_STANDBY_DELAY", "0"))))
if argv is None:
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("serving", json.dumps(argv), os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
if "--exit-code" in argv:
    sys.exit(int(argv[argv.index("--exit-code") + 1]))
while True:
    time.sleep(1)
"""


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def command(tmp_path: Path) -> str:
    path = tmp_path / "bin" / "llm-worker-rbee"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{FAKE_STANDBY}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def make_supervisor(tmp_path: Path, command: str) -> Iterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(hive_id: str = HIVE_ID, **overrides: Any) -> Supervisor:
        values: dict[str, Any] = {
            "queen_url": "http://127.0.0.1:9",
            "hive_id": hive_id,
            "worker_command": command,
            "log_dir": tmp_path / "logs",
            "models_dir": tmp_path / "models",
            **overrides,
        }
        settings = HiveSettings.model_validate(values)
        supervisor = Supervisor(settings, Catalog(settings.models_dir), httpx.AsyncClient())
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.standby.close()
    for handed in HANDED:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handed.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(handed.pid).wait(10)
    HANDED.clear()


HANDED: list[Forked] = []  # the workers a test had a standby fork


def flags_of(hive_id: str, worker_id: str, port: int) -> list[str]:
    return [
        *("--model", "m.gguf", "--model-id", "org/m", "--port", str(port)),
        *("--worker-id", worker_id, "--hive-id", hive_id, "--cpu-set", "0"),
    ]


def hand_over(
    supervisor: Supervisor,
    worker_id: str,
    port: int,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Forked:
    standby = supervisor.standby
    standby.start()
    wait_for("the standby to say it is one", standby.listening)
    log = supervisor.log_path(worker_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    flags = [*flags_of(supervisor.settings.hive_id, worker_id, port), *extra]
    proc = standby.take(flags, {"CUDA_VISIBLE_DEVICES": "1"} if env is None else env, log)
    assert proc is not None
    HANDED.append(proc)
    return proc


def test_an_idle_standby_is_no_worker(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor()
    supervisor.standby.start()
    pid = wait_for("the standby", supervisor.standby.pid)
    cmdline = psutil.Process(pid).cmdline()
    assert "--standby" in cmdline
    assert psutil.Process(pid).environ()[SPAWN_MARKER] == HIVE_ID
    assert supervisor.processes() == []
    assert supervisor.memory_held() == (0, frozenset())


async def test_a_standby_is_never_stopped_as_a_worker(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    supervisor.standby.start()
    pid = wait_for("the standby", supervisor.standby.pid)
    with pytest.raises(NotFound):
        await supervisor.stop(pid)
    assert psutil.Process(pid).is_running()


def test_a_standby_handed_a_worker_is_listed_with_the_flags_it_was_handed(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    proc = hand_over(supervisor, "w1", 8123)

    [worker] = supervisor.processes()
    assert (worker.pid, worker.worker_id, worker.port) == (proc.pid, "w1", 8123)
    assert (worker.model, worker.cpu_set) == ("org/m", "0")
    assert "--standby" in psutil.Process(proc.pid).cmdline()  # found by its file, not its argv
    # Its output goes to the worker's log, with the device's environment set before it serves.
    log = wait_for("its log", lambda: supervisor.log_path("w1").read_text())
    assert '"--worker-id", "w1"' in log
    assert log.strip().endswith("1")  # CUDA_VISIBLE_DEVICES


def test_a_restarted_hive_finds_a_worker_that_was_its_standby(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    first = make_supervisor()
    proc = hand_over(first, "w1", 8124)
    first.standby.close()

    again = make_supervisor()  # same hive id, same log dir: a new hive process would be alike
    assert [(w.pid, w.worker_id, w.port) for w in again.processes()] == [(proc.pid, "w1", 8124)]


async def test_a_restarted_hive_stops_it(make_supervisor: Callable[..., Supervisor]) -> None:
    proc = hand_over(make_supervisor(), "w1", 8125)
    again = make_supervisor()
    stopped = await again.stop(proc.pid)
    assert (stopped.worker_id, stopped.signal) == ("w1", "SIGTERM")
    assert again.processes() == []


def test_another_hive_does_not_take_it_for_its_own(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    proc = hand_over(make_supervisor(), "w1", 8126)
    other = make_supervisor(hive_id=f"{HIVE_ID}-other")
    # Even with the flags file of the first hive's worker in its own directory.
    source = make_supervisor().standby.flags_dir
    assert any(source.iterdir())
    assert other.processes() == []
    assert proc.poll() is None


def test_a_flags_file_never_makes_another_process_a_worker(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    env = worker_env(os.environ, HIVE_ID, None)
    # A process with the hive's mark but not a standby's command line, and a file for its pid.
    sleeper = subprocess.Popen(["sleep", "60"], env=env)
    try:
        flags_dir = supervisor.standby.flags_dir
        flags_dir.mkdir(parents=True)
        handed_flags_file(flags_dir, sleeper.pid).write_text(
            json.dumps({"argv": flags_of(HIVE_ID, "w9", 8127)})
        )
        assert supervisor.processes() == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_flags_of_processes_gone_are_swept(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    proc = hand_over(supervisor, "w1", 8128)
    flags_dir = supervisor.standby.flags_dir
    live = {p.name for p in flags_dir.iterdir()}
    (flags_dir / "999999999-12345.json").write_text('{"argv": []}')  # a pid that is no more
    (flags_dir / f"{proc.pid}-1.json").write_text('{"argv": []}')  # its pid, not its start
    supervisor.standby.sweep()
    assert {p.name for p in flags_dir.iterdir()} == live

    wait_for("it to serve", lambda: supervisor.log_path("w1").read_text())
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0  # its standby reaped it and told the hive how it ended
    supervisor.standby.sweep()
    assert list(flags_dir.iterdir()) == []


def test_a_standby_still_starting_is_handed_the_worker_all_the_same(
    make_supervisor: Callable[..., Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_TEST_STANDBY_DELAY", "1")  # it reads its pipe only then
    supervisor = make_supervisor()
    supervisor.standby.start()
    pid = wait_for("the standby", supervisor.standby.pid)
    wait_for("the standby to say it is one", supervisor.standby.listening)
    proc = hand_over(supervisor, "w1", 8129, env={})
    assert proc.pid != pid
    assert wait_for("its log", lambda: supervisor.log_path("w1").read_text())
    assert [w.worker_id for w in supervisor.processes()] == ["w1"]
    assert supervisor.standby.pid() == pid  # and it stays, for the next one


def test_a_dead_standby_is_not_handed_anything(
    make_supervisor: Callable[..., Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = make_supervisor()
    supervisor.standby.start()
    pid = wait_for("the standby", supervisor.standby.pid)
    psutil.Process(pid).kill()
    wait_for("it to die", lambda: supervisor.standby.pid() is None)
    log = supervisor.log_path("w1")
    log.parent.mkdir(parents=True, exist_ok=True)
    assert supervisor.standby.take(flags_of(HIVE_ID, "w1", 8129), {}, log) is None


def test_a_standby_ends_with_its_hive_and_its_workers_live_on(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    worker = hand_over(supervisor, "w1", 8131)
    proc = psutil.Process(wait_for("the standby", supervisor.standby.pid))
    supervisor.standby.close()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert worker.poll() is None
    assert [w.worker_id for w in supervisor.processes()] == ["w1"]


def test_the_standby_stays_and_forks_each_worker(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    first = hand_over(supervisor, "w1", 8132)
    standby = supervisor.standby.pid()
    second = hand_over(supervisor, "w2", 8133)
    assert supervisor.standby.pid() == standby
    assert len({first.pid, second.pid, standby}) == 3
    # Each in a session of its own: the hive's signals, and the standby's end, do not reach it.
    assert os.getsid(first.pid) == first.pid
    assert os.getsid(second.pid) == second.pid
    assert sorted(w.worker_id for w in supervisor.processes()) == ["w1", "w2"]
    assert '"w2"' in wait_for("its log", lambda: supervisor.log_path("w2").read_text())


def test_the_exit_code_of_a_worker_that_ends_is_told_to_the_hive(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor()
    quitter = hand_over(supervisor, "w1", 8134, "--exit-code", "3")
    wait_for("it to end", lambda: quitter.poll() is not None)
    assert quitter.poll() == 3
    killed = hand_over(supervisor, "w2", 8135)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(10) == -signal.SIGKILL
    assert supervisor.processes() == []


def test_no_standby_when_turned_off(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor(standby=False)
    supervisor.standby.start()
    assert supervisor.standby.pid() is None


def test_a_command_that_never_says_it_is_a_standby_is_never_handed_a_worker(
    make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    # A worker command that knows no --standby (a wrapper, an older worker) still starts:
    # here it sleeps, as if loading whatever it was given.
    wrapper = tmp_path / "bin" / "other" / "llm-worker-rbee"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    supervisor = make_supervisor(worker_command=str(wrapper))
    supervisor.standby.start()
    wait_for("the standby", supervisor.standby.pid)
    time.sleep(0.5)
    log = supervisor.log_path("w1")
    log.parent.mkdir(parents=True, exist_ok=True)
    assert supervisor.standby.take(flags_of(HIVE_ID, "w1", 8130), {}, log) is None
