"""Children started without a fork (rbee.common.children): their output and exit code on the
event loop, and their death with the parent, with setpriv and without it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from rbee.common.children import Child, ended, spawn
from rbee.common.lines import read_lines

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the death with the parent is Linux's"
)


async def test_a_childs_output_and_exit_code_are_read_on_the_loop() -> None:
    child = Child(spawn(["/bin/sh", "-c", "echo one; echo two >&2; exit 3"], os.environ))
    lines = [line async for line in read_lines(child.stdout())]
    async with asyncio.timeout(10):
        assert await child.wait() == 3
    assert lines == ["one", "two"]
    assert child.returncode == 3


async def test_a_killed_child_says_by_which_signal() -> None:
    child = Child(spawn(["/bin/sleep", "60"], os.environ))
    child.kill()
    async with asyncio.timeout(10):
        assert await child.wait() == -9
    child.kill()  # killing it again is harmless


async def test_the_end_of_a_process_that_is_gone_is_seen_at_once() -> None:
    proc = await asyncio.create_subprocess_exec("/bin/true")
    await proc.wait()
    async with asyncio.timeout(5):
        await ended(proc.pid)


PARENT = """
import os, sys, time
from rbee.common.children import spawn
child = spawn(["/bin/sleep", "600"], os.environ)
print(child.pid, flush=True)
time.sleep(600)
"""


# A setpriv older than util-linux 2.33, which knows no --pdeathsig (and fails if run).
OLD_SETPRIV = """#!/bin/sh
echo "Usage: setpriv [options] <program> [<argument>...]"
exit 1
"""


@pytest.mark.parametrize("setpriv", ["setpriv", "none", "too-old"])
def test_a_child_dies_with_its_parent_however_the_parent_dies(tmp_path: Path, setpriv: str) -> None:
    env = dict(os.environ)
    if setpriv != "setpriv":  # the child asks the kernel itself, before its exec
        env["PATH"] = str(tmp_path)
    if setpriv == "too-old":
        fake = tmp_path / "setpriv"
        fake.write_text(OLD_SETPRIV)
        fake.chmod(0o755)
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT)], stdout=subprocess.PIPE, env=env
    )
    pid = None
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        child = psutil.Process(pid)
        assert child.ppid() == parent.pid
        deadline = time.monotonic() + 10
        while child.cmdline() != ["/bin/sleep", "600"]:  # setpriv, if used, runs the command
            assert time.monotonic() < deadline, f"the command never ran: {child.cmdline()}"
            time.sleep(0.01)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if pid is not None:  # a child that outlived the test is not left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
