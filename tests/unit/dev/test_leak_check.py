"""The test run's own check (tests/conftest.py): a process a test leaves behind fails the run and
is killed; processes that are not the run's are left alone. And a daemon a test started ends with
whatever it started."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from rbee_testing.processes import DAEMON_MARKER, ServerProcess, free_port, marked_processes

CONFTEST = Path(__file__).parents[2] / "conftest.py"


def run_pytest(folder: Path, test_source: str, *options: str) -> subprocess.CompletedProcess[str]:
    """pytest on one test file, in a folder of its own, with the suite's conftest."""
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_it.py").write_text(textwrap.dedent(test_source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--leak-grace=1",
            *options,
            "test_it.py",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_leaked_process_and_an_orphaned_grandchild_fail_the_run_and_are_killed(
    tmp_path: Path,
) -> None:
    done = run_pytest(
        tmp_path,
        """
        import subprocess
        from pathlib import Path

        def test_fine():
            subprocess.run(["true"], check=True)

        def test_leaks(tmp_path):
            # One in a session of its own, one whose parent exits at once (adopted by PID 1).
            own = subprocess.Popen(["sleep", "60"], start_new_session=True)
            pids = Path(__file__).with_name("pids")
            subprocess.run(["sh", "-c", f"sleep 61 & echo $! > {pids}"], check=True)
            with pids.open("a") as file:
                file.write(f"{own.pid}\\n")
        """,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    assert "2 process(es) started by the tests outlived them (now killed)" in done.stdout
    orphan, own = (int(pid) for pid in (tmp_path / "pids").read_text().split())
    assert f"pid {orphan} (test_it.py::test_leaks): sleep 61" in done.stdout
    assert f"pid {own} (test_it.py::test_leaks): sleep 60" in done.stdout
    assert gone(orphan)
    assert gone(own)


def test_a_run_that_stops_what_it_started_passes_and_others_processes_are_left_alone(
    tmp_path: Path,
) -> None:
    # Started by this run, not by the one under test: like another suite's on the same machine.
    other = subprocess.Popen(["sleep", "62"], start_new_session=True)
    try:
        done = run_pytest(
            tmp_path,
            """
            import subprocess

            def test_stops_its_own():
                proc = subprocess.Popen(["sleep", "60"])
                proc.terminate()
                proc.wait()
            """,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "outlived" not in done.stdout
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_what_a_run_stopped_early_still_tears_down_is_no_leak(tmp_path: Path) -> None:
    # Interrupted (Ctrl-C), the session's fixtures are torn down only as the session finishes.
    done = run_pytest(
        tmp_path,
        """
        import subprocess
        import pytest

        @pytest.fixture(scope="session")
        def daemon():
            proc = subprocess.Popen(["sleep", "60"])
            yield proc
            proc.terminate()
            proc.wait()

        def test_interrupted(daemon):
            raise KeyboardInterrupt

        def test_never_runs(daemon):
            pass
        """,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "outlived" not in done.stdout


@pytest.mark.parametrize("status", [1, 2])
def test_a_failing_run_keeps_its_exit_status(tmp_path: Path, status: int) -> None:
    failing = "assert False" if status == 1 else "raise KeyboardInterrupt"
    done = run_pytest(
        tmp_path,
        f"""
        import subprocess

        def test_leaks_and_fails():
            subprocess.Popen(["sleep", "60"], start_new_session=True)
            {failing}
        """,
    )
    assert done.returncode == status, done.stdout + done.stderr
    assert "1 process(es) started by the tests outlived them (now killed)" in done.stdout


def detached_children(daemon: ServerProcess) -> list[psutil.Process]:
    return [
        p
        for p in marked_processes(DAEMON_MARKER, daemon.mark)
        if p.pid != daemon.pid and p.status() != psutil.STATUS_ZOMBIE
    ]


def test_a_daemons_teardown_ends_what_it_started_in_a_session_of_its_own() -> None:
    port = free_port()
    script = f"setsid sleep 63 & exec {sys.executable} -m http.server -b 127.0.0.1 {port}"
    with ServerProcess(["sh", "-c", script], health_url=f"http://127.0.0.1:{port}/") as daemon:
        [child] = detached_children(daemon)
    assert gone(child.pid)


def test_a_daemon_that_never_gets_healthy_leaves_nothing_behind() -> None:
    port = free_port()
    daemon = ServerProcess(
        ["sh", "-c", "setsid sleep 64 & exec sleep 65"], health_url=f"http://127.0.0.1:{port}/"
    )
    with pytest.raises(TimeoutError, match="not healthy after 1s"):
        daemon.start(timeout_s=1)
    assert gone(daemon.pid)
    assert detached_children(daemon) == []
