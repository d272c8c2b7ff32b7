"""What every test run shares: nothing it starts may outlive it.

Every process the run starts inherits a mark (`RBEE_TEST_RUN`, fresh for each run, so runs at the
same time on one machine tell theirs apart); at the end, whatever still carries it is killed and
the run fails, naming each process and the test that was running when it started.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from rbee_testing.processes import RUN_MARKER, Survivor, end_marked_processes, process_clock

# When each test so far started (its setup), on process_clock(): which test started a process
# that survived.
_starts: list[tuple[str, float]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--leak-grace",
        type=float,
        default=10.0,
        help="seconds a process the tests started may take to exit once they are done",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Always a fresh id: a run started by a test (pytest in pytest) checks its own processes.
    os.environ[RUN_MARKER] = uuid.uuid4().hex


def pytest_runtest_logstart(nodeid: str) -> None:
    _starts.append((nodeid, process_clock()))


def started_during(survivor: Survivor) -> str:
    """The test that was running (or had last run) when the process started."""
    # Process start times are counted down to clock ticks (10 ms): one started as a test began
    # may look a little older.
    for nodeid, start in reversed(_starts):
        if start - 0.02 <= survivor.started:
            return nodeid
    return "before the first test"


# Last: an interrupted run tears its fixtures down in pytest's own pytest_sessionfinish.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    grace_s = session.config.getoption("leak_grace")
    survivors = end_marked_processes(RUN_MARKER, os.environ[RUN_MARKER], wait_s=grace_s)
    if not survivors:
        return
    lines = [f"pid {s.pid} ({started_during(s)}): {s.argv}" for s in survivors]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    title = f"{len(survivors)} process(es) started by the tests outlived them (now killed)"
    if reporter is not None:
        reporter.write_sep("=", title, red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print(title, *lines, sep="\n", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
