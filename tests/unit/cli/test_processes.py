"""Finding, starting, recognising and stopping local processes; the state directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from rbee.cli import cluster, processes, state
from rbee.cli.commands.up import until_stopped
from rbee.cli.context import CliError
from rbee.cli.plan import UpPlan, from_flags
from rbee.clients.queen import QueenClient


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RBEE_STATE_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[processes.Started]:
    started = processes.spawn(
        "sleeper",
        [sys.executable, "-c", "import time; print('hello', flush=True); time.sleep(60)"],
        url="http://127.0.0.1:1",
        log=tmp_path / "sleeper.log",
        env=dict(os.environ),
    )
    yield started
    if (proc := started.process()) is not None:
        processes.terminate(proc, 5)


def test_find_program_prefers_the_script_next_to_python() -> None:
    assert processes.find_program("queen-rbee") == str(Path(sys.executable).parent / "queen-rbee")


def test_a_missing_program_is_explained() -> None:
    with pytest.raises(CliError, match="cannot find the `no-such-rbee` program next to"):
        processes.find_program("no-such-rbee")


def test_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert processes.port_in_use("127.0.0.1", port)
    assert not processes.port_in_use("127.0.0.1", port)


def test_spawned_process_runs_in_its_own_session_with_its_output_logged(
    sleeper: processes.Started,
) -> None:
    proc = sleeper.process()
    assert proc is not None
    assert os.getsid(proc.pid) == proc.pid  # a Ctrl-C for `rbee` does not reach it
    assert os.getsid(proc.pid) != os.getsid(0)
    assert processes.terminate(proc, 5)
    assert not sleeper.alive()


def test_a_reused_pid_is_not_mistaken_for_ours(sleeper: processes.Started) -> None:
    imposter = processes.Started("x", sleeper.pid, sleeper.create_time - 100, "", Path())
    assert sleeper.alive()
    assert not imposter.alive()


def test_state_records_round_trip_and_stale_ones_are_dropped(
    sleeper: processes.Started, state_dir: Path
) -> None:
    path = state.pid_path("queen-rbee")
    state.save(path, sleeper, extra="yes")
    loaded = state.load_running(path)
    assert loaded is not None
    assert loaded[0] == sleeper
    assert loaded[1]["extra"] == "yes"
    assert path.parent == state_dir

    proc = sleeper.process()
    assert proc is not None
    processes.terminate(proc, 5)
    assert state.load_running(path) is None
    assert not path.exists()


def test_a_corrupt_record_reads_as_none() -> None:
    path = state.pid_path("queen-rbee")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert state.load(path) is None


async def test_wait_healthy_reports_a_daemon_that_died(tmp_path: Path) -> None:
    started = processes.spawn(
        "queen-rbee",
        [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(2)"],
        url="http://127.0.0.1:9",
        log=tmp_path / "q.log",
        env=dict(os.environ),
    )
    with pytest.raises(CliError, match=r"queen-rbee exited during start-up: boom: bad flag \(log"):
        await processes.wait_healthy(started, 30)


def test_leftover_workers_of_our_queen_are_found_and_no_others(tmp_path: Path) -> None:
    script = tmp_path / "llm-worker-rbee"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    ours = processes.spawn(
        "w",
        [str(script), "--queen-url", "http://127.0.0.1:9931/"],
        url="",
        log=tmp_path / "a",
        env=dict(os.environ),
    )
    theirs = processes.spawn(
        "w",
        [str(script), "--queen-url=http://127.0.0.1:9932"],
        url="",
        log=tmp_path / "b",
        env=dict(os.environ),
    )
    try:
        assert [p.pid for p in cluster.worker_processes("http://127.0.0.1:9931")] == [ours.pid]
        assert [p.pid for p in cluster.worker_processes("http://127.0.0.1:9932")] == [theirs.pid]
    finally:
        for started in (ours, theirs):
            if (proc := started.process()) is not None:
                processes.terminate(proc, 5)


def plan(port: int, hive_port: int) -> UpPlan:
    return from_flags(model="m", workers=1, port=port, hive_port=hive_port, hive_id="h")


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


def _wait_for(check: Callable[[], bool]) -> None:
    for _ in range(300):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _started(tmp_path: Path, name: str, argv: list[str]) -> psutil.Process:
    """A process started as `rbee up` starts its daemons (a session of its own)."""
    proc = processes.spawn(
        name, argv, url="", log=tmp_path / f"{name}.log", env=dict(os.environ)
    ).process()
    assert proc is not None
    return proc


def test_a_hives_standby_is_left_to_its_hive_and_its_forks_are_stopped(tmp_path: Path) -> None:
    """`rbee up` stops leftover workers by pid before it stops the hives. A hive's standby
    (a worker command line, `--standby`) is the hive's to stop: SIGTERMed by the CLI, it stays
    the hive's zombie, and the stop waited on it for 15 s. A worker the standby forked, and a
    standby whose hive is gone, are still stopped."""
    url = "http://127.0.0.1:9933"
    worker = _script(
        tmp_path / "llm-worker-rbee",
        "import os, time\nos.fork()\ntime.sleep(60)\n",  # the standby and the worker it forks
    )
    hive_proc = _started(
        tmp_path,
        "rbee-hive",
        [
            _script(
                tmp_path / "rbee-hive",
                "import subprocess, sys, time\n"
                f"subprocess.Popen([{worker!r}, '--standby', '--hive-id', 'h', '--queen-url', "
                f"{url!r}])\ntime.sleep(60)\n",
            )
        ],
    )
    try:
        _wait_for(lambda: len(hive_proc.children(recursive=True)) == 2)
        (standby,) = hive_proc.children()
        (fork,) = standby.children()

        assert [p.pid for p in cluster.worker_processes(url)] == [fork.pid]

        processes.terminate(hive_proc, 10)  # a hive that is gone: its standby is a leftover
        _wait_for(lambda: standby.ppid() != hive_proc.pid)
        assert sorted(p.pid for p in cluster.worker_processes(url)) == sorted(
            [standby.pid, fork.pid]
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hive_proc.pid, signal.SIGKILL)


def test_a_process_that_exited_is_stopped_though_its_parent_has_not_reaped_it(
    tmp_path: Path,
) -> None:
    """A zombie has exited: the stop does not wait for its parent to reap it."""
    parent_proc = _started(
        tmp_path,
        "parent",
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "time.sleep(60)\n",  # never reaps its child
        ],
    )
    try:
        _wait_for(lambda: len(parent_proc.children()) == 1)
        (child,) = parent_proc.children()

        assert processes.terminate(child, 10)  # on SIGTERM alone: not killed after 10 s
        assert child.status() == psutil.STATUS_ZOMBIE
    finally:
        processes.terminate(parent_proc, 5)


def test_a_second_rbee_up_is_refused_clearly(sleeper: processes.Started) -> None:
    running = processes.Started(
        "rbee up", sleeper.pid, sleeper.create_time, "http://127.0.0.1:7833", Path()
    )
    state.save(state.pid_path(cluster.LOCK), running, children=[])

    with pytest.raises(CliError) as raised:
        cluster.check_free(plan(1, 2))
    assert str(raised.value) == (
        f"rbee up is already running (pid {sleeper.pid}) with its OpenAI API at "
        "http://127.0.0.1:7833/v1 — stop it with `rbee down` or Ctrl-C in its terminal; "
        "another cluster beside it needs its own --name and --port"
    )


def test_rbee_up_on_a_taken_port_names_the_flag() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        with pytest.raises(CliError, match=f"port {taken} is already in use .* --hive-port"):
            cluster.check_free(plan(0, taken))


def test_what_a_killed_rbee_up_left_behind_is_stopped(sleeper: processes.Started) -> None:
    me = psutil.Process()
    dead = processes.Started(
        "rbee up", me.pid, me.create_time() - 100, "http://127.0.0.1:1", Path()
    )
    child = {"name": "queen-rbee", "pid": sleeper.pid, "create_time": sleeper.create_time}
    state.save(state.pid_path(cluster.LOCK), dead, children=[child])

    assert cluster.clean_stale_lock() == [f"queen-rbee (pid {sleeper.pid})"]
    assert not sleeper.alive()
    assert not state.pid_path(cluster.LOCK).exists()


async def test_until_stopped_returns_the_result_or_none_once_stopped() -> None:
    stop = asyncio.Event()

    async def answer() -> int:
        return 42

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0  # pragma: no cover

    async def fails_when_cancelled() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise CliError("cancelled job j1") from None
        return 0  # pragma: no cover

    assert await until_stopped(answer(), stop) == 42
    asyncio.get_running_loop().call_soon(stop.set)
    assert await until_stopped(forever(), stop) is None
    assert await until_stopped(fails_when_cancelled(), stop) is None


async def test_a_cluster_that_never_started_stops_nothing(tmp_path: Path) -> None:
    """A refused or failed `rbee up` must not touch the workers of the cluster already there."""
    up_plan = plan(9933, 9934)
    script = tmp_path / "llm-worker-rbee"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    other = processes.spawn(
        "w",
        [str(script), "--queen-url", up_plan.queen_url],
        url="",
        log=tmp_path / "w",
        env=dict(os.environ),
    )
    try:
        never_started = cluster.Cluster(up_plan, lambda url, token: QueenClient(url), print)
        await never_started.stop()
        assert other.alive()
    finally:
        if (proc := other.process()) is not None:
            processes.terminate(proc, 5)
