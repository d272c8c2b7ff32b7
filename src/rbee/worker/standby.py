"""`llm-worker-rbee --standby`: imports what a worker runs on once, then forks a worker per order.

The hive (`rbee.hive.standby`) keeps one standby started, so that a new worker starts without
its second of imports: the standby imports them while it waits, and each worker it is asked
for is a fork of it, its imports done. The standby stays for the next one: a swap never waits
for imports, nor shares the cores with those of the standby after it.

What goes over its pipes, a line at a time:
- to the hive, first: `standby` (it is one; a command that never says so is never handed a
  worker);
- from the hive: a JSON order, `argv` (the worker's flags), `env` (added to its environment:
  its device's), `log` (its output) and `flags_dir` (where the hive finds the flags of a
  worker that was a standby, `rbee.common.worker_command.handed_flags_file`);
- to the hive, for each order: `worker PID` once the worker is forked and its flags file
  written, or `failed REASON` (then nothing runs);
- to the hive, whenever a worker it forked ends: `exit PID CODE` (its exit code, as
  `subprocess` gives one: -N for signal N). The standby is the workers' parent and reaps them.

At the end of its stdin (the hive stopped, however it stopped) the standby exits; the workers
it forked live on, in sessions of their own, like every worker.

Its imports run in a thread of low priority (a model loading or a request generating meanwhile
keeps the cores: llama.cpp's threads lose much of their speed to any busy process) while its
main thread reads the pipe. An order that comes before they are done waits for the rest, at
the normal priority again where the system lets a process raise its own (root, CAP_SYS_NICE or
RLIMIT_NICE). A fork is made only once they are done, from a process with that one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from rbee.common.worker_command import handed_flags_file

STANDING_BY = b"standby\n"
IMPORTS_NICE = 10  # the import thread's, while nothing waits for it


def renice(thread: threading.Thread, nice: int) -> None:
    # Linux gives each thread a niceness of its own: the process's other threads keep theirs.
    if sys.platform == "linux" and thread.native_id is not None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread.native_id, nice)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(1, line.encode() + b"\n")


def _reap(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD in the standby: reap the workers that ended and tell the hive their codes."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        # Never blocks: a hive that has not read its pipe for a long while loses codes, never
        # the standby.
        os.set_blocking(1, False)
        try:
            _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
        finally:
            os.set_blocking(1, True)


def _become_worker(order: dict[str, object], go: int, ready: int) -> list[str]:
    """In the fork: take a session of its own and say so, wait for the standby's word that the
    flags file is written (or exit), then take the worker's environment and log."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its own children are its own to wait for
    os.setsid()  # the hive's signals, and the standby's end, must not reach it
    os.write(ready, b"s")
    os.close(ready)
    word = os.read(go, 1)
    os.close(go)
    if word != b"g":
        os._exit(1)
    env = order.get("env") or {}
    assert isinstance(env, dict)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    log = os.open(str(order["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((0, null), (1, log), (2, log)):
        os.dup2(target, fd)
    os.close(log)
    os.close(null)
    argv = order["argv"]
    assert isinstance(argv, list)
    return [str(arg) for arg in argv]


def _fork(order: dict[str, object]) -> list[str] | None:
    """Fork a worker for `order`: its flags in the fork, None in the standby. The hive hears
    `worker PID` only once the fork has a session of its own and its flags file is written."""
    argv = order["argv"]
    flags_dir = Path(str(order["flags_dir"]))
    go, going = os.pipe()
    set_up, ready = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (go, going, set_up, ready):
            os.close(fd)
        _say(f"failed cannot fork: {exc}")
        return None
    if pid == 0:
        try:
            os.close(going)
            os.close(set_up)
            return _become_worker(order, go, ready)
        except BaseException:
            os._exit(1)
    os.close(go)
    os.close(ready)
    try:
        if os.read(set_up, 1) != b"s":
            raise OSError("the fork ended before it began")
        flags_dir.mkdir(parents=True, exist_ok=True)
        path = handed_flags_file(flags_dir, pid)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"argv": argv}))
        partial.replace(path)  # whole or absent, for a hive that reads it meanwhile
    except (OSError, ProcessLookupError) as exc:
        os.close(going)  # the fork exits unseen: no flags file, no worker
        _say(f"failed cannot set up the worker: {exc}")
        return None
    finally:
        os.close(set_up)
    os.write(going, b"g")
    os.close(going)
    _say(f"worker {pid}")
    return None


def serve_orders(
    imports: Callable[[], None], before_fork: Callable[[list[str]], None] = lambda argv: None
) -> list[str] | None:
    """Say it is a standby, run `imports` in a thread of low priority, and fork a worker per
    order on stdin, calling `before_fork` with its flags first (what the standby learns there,
    every later fork has too). Returns in each fork, with the worker's flags; in the standby,
    returns None at the end of stdin."""
    _say(STANDING_BY.decode().strip())
    thread = threading.Thread(target=imports, name="standby-imports", daemon=True)
    thread.start()
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        line = sys.stdin.buffer.readline()
        if not line.strip():
            return None
        try:
            order = json.loads(line)
        except ValueError:
            _say("failed the order is not JSON")
            continue
        renice(thread, 0)  # a worker waits for it now
        thread.join()
        before_fork([str(arg) for arg in order.get("argv", [])])
        argv = _fork(order)
        if argv is not None:
            return argv
