"""The hive's standby: one `llm-worker-rbee --standby` kept started, that forks its workers.

A worker's Python imports take about a second before its llama-server even starts; a swap
would wait for all of it. So the hive keeps one standby process (`rbee.worker.standby`, where
its pipe's lines are described): it imports once, and each worker the hive starts is a fork of
it, its imports done, in a session of its own. The standby stays for the next spawn. A standby
first says it is one (`standby` on its stdout, within a moment of its start); a spawn that
comes while it still imports waits for the rest of them (time won over a worker started
afresh, which would import all of them), but none is handed to one that has not said it yet.

A standby is no worker: not listed, not counted in the memory the hive's workers hold, never
stoppable through the workers API. At the end of its pipe (the hive stopped, however it
stopped) it exits, so none outlives its hive; the workers it forked live on, like every worker.

Finding a worker the standby forked: its command line is the standby's (`--standby --hive-id
ID`), so the standby writes the flags of each fork to a file in `LOG_DIR/standby`, named after
the fork's pid and start time (`handed_flags_file`), before the fork runs. The operating system
stays the one list of what runs: a file is read only for a live process whose command line is
a standby of this hive and whose environment carries the hive's mark, and only if the pid and
start time match (a pid used again is another process); files of processes that have gone are
swept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from rbee.common.worker_command import (
    STANDBY_FLAG,
    handed_flags_file,
    worker_command_flags,
)

log = logging.getLogger("rbee.hive.standby")
STANDING_BY = b"standby\n"  # what a standby says first, on its stdout
CLOSE_WAIT_S = 5.0  # a standby ends at the end of its pipe at once; one that does not is killed
# Longest a spawn waits for the standby to fork its worker: its imports may still be running, on
# a busy machine for several seconds; one that takes longer is replaced.
FORK_TIMEOUT_S = 60.0
EXIT_NEWS_S = 1.0  # longest the exit code of a fork that has ended is waited for
EXIT_UNKNOWN = -256  # the exit code of a fork whose standby ended before telling it
KEPT_EXITS = 256


def standby_flags(cmdline: Sequence[str], hive_id: str) -> bool:
    """A standby command line of this hive (`llm-worker-rbee --standby --hive-id ID …`)."""
    if STANDBY_FLAG not in cmdline[1:4]:
        return False
    flags = worker_command_flags(cmdline)
    return flags is not None and flags.get("--hive-id") == hive_id


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class Forked:
    """A worker the standby forked: not the hive's child (the standby is its parent and reaps
    it), so what `subprocess.Popen` tells of a child is asked of the standby and the system."""

    def __init__(self, pid: int, standby: Standby) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._standby = standby
        try:  # keeps its start time: a pid used again is not it
            self._proc: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:  # ended already (its exit code is on the way)
            self._proc = None

    def poll(self) -> int | None:
        """Its exit code once it has ended, else None; EXIT_UNKNOWN when nobody said it (its
        standby ended first)."""
        if self.returncode is None and not self._running():
            code = self._standby.exit_code(self.pid)
            self.returncode = EXIT_UNKNOWN if code is None else code
        return self.returncode

    def _running(self) -> bool:
        if self._proc is None:
            return False
        try:
            return self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def wait(self, timeout: float | None = None) -> int:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except psutil.TimeoutExpired:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0) from None
            except psutil.Error:
                pass
        code = self.poll()
        assert code is not None
        return code


class Standby:
    """The hive's one standby process, the workers it forked, and the flags of those."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        flags_dir: Path,
        output: Path,
        *,
        enabled: bool = True,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.flags_dir = flags_dir
        self.output = output  # what the standby and its forks print before they have a log
        self.enabled = enabled
        self._proc: subprocess.Popen[bytes] | None = None
        self._listening = False  # it said it is a standby
        self._pending = b""  # read from its stdout, not yet a whole line
        self._exits: dict[int, int] = {}  # the exit codes it told of, by pid (the latest few)
        self._forked: set[int] = set()  # its forks whose exit code has not been asked for
        self._lock = threading.Lock()  # one reader of its pipe at a time (spawns run in threads)

    def start(self) -> None:
        """Start a standby, unless one runs already (or standbys are off)."""
        with self._lock:
            if not self.enabled or (self._proc is not None and self._proc.poll() is None):
                return
            if self._proc is not None:  # one that died (it could not import, say)
                _close_pipes(self._proc)
            self.sweep()
            self.output.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.output.open("ab") as out:
                    self._proc = subprocess.Popen(
                        self.command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,  # its lines to the hive
                        stderr=out,
                        env=self.env,
                        start_new_session=True,  # as a worker: the hive's signals must not reach it
                    )
            except OSError as exc:
                log.warning("cannot start a standby worker: %s", exc.strerror or exc)
                self._proc = None
            self._listening = False
            self._pending = b""
            self._forked.clear()  # an earlier standby's forks: nobody tells their codes now

    def listening(self) -> bool:
        """The standby lives and has said it is one (a worker command that knows no standby,
        a wrapper say, never does: it is never handed a worker)."""
        with self._lock:
            return self._said_standby()

    def _said_standby(self) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        if not self._listening:
            line = self._line(0.0)
            self._listening = line == STANDING_BY
        return self._listening

    def _line(self, timeout_s: float) -> bytes | None:
        """Its next line (with its newline), waiting up to `timeout_s`; None when none came.
        Exit codes it tells of on the way are kept, not returned."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            line, newline, rest = self._pending.partition(b"\n")
            if newline:
                self._pending = rest
                if not line.startswith(b"exit "):
                    return line + newline
                with contextlib.suppress(ValueError):
                    pid, code = (int(word) for word in line.split()[1:3])
                    self._exits[pid] = code
                    while len(self._exits) > KEPT_EXITS:
                        del self._exits[next(iter(self._exits))]
                continue
            remaining = deadline - time.monotonic()
            try:
                if not select.select([fd], [], [], max(0.0, remaining))[0]:
                    return None
                chunk = os.read(fd, 4096)
            except (OSError, ValueError):
                return None
            if not chunk:  # it ended
                return None
            self._pending += chunk

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a worker this standby forked that has ended (None: not one of its
        forks, or its standby ended first). It reaps a fork the moment it ends and says so
        just after: this waits for that word a moment, only for one of its own."""
        deadline = time.monotonic() + EXIT_NEWS_S
        while True:
            # A spawn waiting for a fork holds the pipe (up to FORK_TIMEOUT_S) and keeps the
            # exit codes it reads on the way: this never waits for it, only looks.
            if self._lock.acquire(blocking=False):
                try:
                    while self._line(0.0) is not None:  # a stray line: nothing waits for it
                        pass
                finally:
                    self._lock.release()
            if pid in self._exits or pid not in self._forked:
                self._forked.discard(pid)
                return self._exits.get(pid)
            if time.monotonic() >= deadline or self._proc is None or self._proc.poll() is not None:
                return None
            time.sleep(0.005)

    def take(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Forked | None:
        """Have the standby fork a worker with these flags (`argv`, without the executable), the
        environment its device needs and its log file. None when there is no standby that has
        said it is one (start the worker afresh). Blocks while its imports finish: call it
        from a thread."""
        with self._lock:
            if not self._said_standby():
                return None
            proc = self._proc
            assert proc is not None
            assert proc.stdin is not None
            order = {
                "argv": list(argv),
                "env": dict(env),
                "log": str(log_path),
                "flags_dir": str(self.flags_dir),
            }
            try:
                proc.stdin.write(json.dumps(order).encode() + b"\n")
                proc.stdin.flush()
            except OSError as exc:
                self._give_up(f"could not hand it the worker: {exc}")
                return None
            answer = self._line(FORK_TIMEOUT_S)
            if answer is None:
                self._give_up(f"it did not fork the worker within {FORK_TIMEOUT_S:g}s")
                return None
            word, _, rest = answer.decode(errors="replace").strip().partition(" ")
            if word == "worker" and rest.isdigit():
                self._forked.add(int(rest))
                return Forked(int(rest), self)
            if word == "failed":  # that worker only: the standby serves the next
                log.warning("the standby worker could not fork a worker: %s", rest)
            else:
                self._give_up(f"answered {answer[:200]!r} to an order")
            return None

    def _give_up(self, why: str) -> None:
        """The standby failed an order: it is replaced, and the worker starts afresh."""
        proc, self._proc, self._listening = self._proc, None, False
        log.warning("the standby worker (pid %s) %s", proc.pid if proc else "?", why)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            _close_pipes(proc)
            proc.wait()

    def handed_argv(self, proc: psutil.Process) -> list[str] | None:
        """The flags of this process if the standby forked it as a worker, or None (the
        standby itself, or not one of its forks). The caller checked its command line and mark."""
        try:
            argv = json.loads(handed_flags_file(self.flags_dir, proc.pid).read_text())["argv"]
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        if not isinstance(argv, list):
            return None
        return [str(arg) for arg in argv]

    def sweep(self) -> None:
        """Forget the flags of processes that have gone (their pid is free, or another's)."""
        with contextlib.suppress(OSError):
            for path in self.flags_dir.iterdir():
                pid_text, _, _ = path.name.partition("-")
                try:  # a file half written (.tmp) goes with its process too
                    live = path.with_suffix(".json") == handed_flags_file(
                        self.flags_dir, int(pid_text)
                    )
                except (ValueError, ProcessLookupError):
                    live = False
                if not live:
                    with contextlib.suppress(OSError):
                        path.unlink()

    def pid(self) -> int | None:
        """The standby's pid (None: none runs)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """End the standby: it exits at the end of its pipe; killed if it does not. The workers
        it forked keep running."""
        with self._lock:
            proc, self._proc, self._listening = self._proc, None, False
        if proc is None:
            return
        _close_pipes(proc)
        try:
            proc.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
