"""The one look at /proc that a heartbeat shares: a worker's processes are all those under it."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from rbee.hive.proctable import ProcessTable, resident

# A parent whose child starts a grandchild, as a worker runs llama-server (which may run more).
TREE = (
    "import subprocess, sys, time\n"
    'inner = \'import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", '
    '"import time; time.sleep(60)"]); time.sleep(60)\'\n'
    "subprocess.Popen([sys.executable, '-c', inner])\n"
    "time.sleep(60)\n"
)


def test_the_processes_under_one_are_found_from_one_look() -> None:
    parent = subprocess.Popen([sys.executable, "-c", TREE])
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(parent.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the tree never grew"
            time.sleep(0.05)
        expected = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}

        table = ProcessTable.read()
        under = table.descendants(parent.pid)

        assert {p.pid for p in under} == expected
        assert parent.pid not in {p.pid for p in under}
        assert resident(under) > 0
        assert table.descendants(2**22 + 1) == [], "a pid with nothing under it"
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
