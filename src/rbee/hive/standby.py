"""A warm standby worker: one `llm-worker-rbee --standby` kept started, its imports done.

A worker's Python imports take about a second before its llama-server even starts; a swap
waits for all of it. So the hive keeps one worker process started ahead of need, waiting on a
pipe: a spawn hands it the worker's flags, the environment its device needs and its log file,
and it serves from there as a worker started afresh would; the next standby starts at once. A
standby first says it is one (`standby` on its stdout, within a moment of its start); a spawn
that comes while it still imports is handed to it all the same (what it has imported already
is time won over a worker started afresh), but never one that has not said it yet.

A standby is no worker: not listed, not counted in the memory the hive's workers hold, never
stoppable through the workers API. It reads its pipe until told what to serve; at end of file
(the hive stopped, however it stopped) it exits, so none outlives its hive. Once handed its
flags it no longer reads the pipe: like every worker, it outlives its hive.

Finding a worker that was a standby: its command line still says `--standby --hive-id ID`, so
the hive writes the flags it handed over to a file in `LOG_DIR/standby`, named after the
process's pid and start time, before handing them. The operating system stays the one list of
what runs: a file is read only for a live process whose command line is a standby of this hive
and whose environment carries the hive's mark, and only if the pid and start time match (a pid
used again is another process); files of processes that have gone are swept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from rbee.common.worker_command import WORKER_EXECUTABLE, parse_flags

log = logging.getLogger("rbee.hive.standby")
STANDBY_FLAG = "--standby"
STANDING_BY = b"standby\n"  # what a standby says first, on its stdout
CLOSE_WAIT_S = 5.0  # a standby ends at the end of its pipe at once; one that does not is killed


def standby_flags(cmdline: Sequence[str], hive_id: str) -> bool:
    """A standby command line of this hive (`llm-worker-rbee --standby --hive-id ID …`)."""
    if len(cmdline) < 2 or STANDBY_FLAG not in cmdline[1:4]:
        return False
    if not any(
        Path(arg).name == WORKER_EXECUTABLE or arg.startswith("rbee.worker") for arg in cmdline[:3]
    ):
        return False
    return parse_flags(cmdline[1:]).get("--hive-id") == hive_id


def started_ticks(pid: int) -> str:
    """When the process started, exactly as the kernel counts it (Linux: clock ticks since
    boot; psutil's create_time adds a boot time that may be read a second off by another
    process, so a restarted hive would miss its files). Raises psutil.NoSuchProcess."""
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            raise psutil.NoSuchProcess(pid) from None
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime
    return f"{psutil.Process(pid).create_time():.2f}"


def _key(pid: int) -> str:
    return f"{pid}-{started_ticks(pid)}.json"


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class Standby:
    """The hive's one standby worker process, and the flags of those handed over."""

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
        self.output = output  # what a standby prints before it is handed its log
        self.enabled = enabled
        self._proc: subprocess.Popen[bytes] | None = None
        self._listening = False  # it said it is a standby

    def start(self) -> None:
        """Start a standby, unless one is waiting already (or standbys are off)."""
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
                    stdout=subprocess.PIPE,  # says it is a standby; then its log replaces it
                    stderr=out,
                    env=self.env,
                    start_new_session=True,  # as a worker: the hive's signals must not reach it
                )
        except OSError as exc:
            log.warning("cannot start a standby worker: %s", exc.strerror or exc)
            self._proc = None
        self._listening = False

    def listening(self) -> bool:
        """The standby lives and has said it is one (a worker command that knows no standby,
        a wrapper say, never does: it is never handed a worker)."""
        proc = self._proc
        if proc is None or proc.poll() is not None or proc.stdout is None:
            return False
        if not self._listening:
            with contextlib.suppress(OSError, ValueError):
                if select.select([proc.stdout], [], [], 0)[0]:
                    self._listening = proc.stdout.readline() == STANDING_BY
        return self._listening

    def take(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> subprocess.Popen[bytes] | None:
        """Hand the standby a worker's flags (`argv`, without the executable), the environment
        its device needs and its log file: the standby's process, a worker from now on. None
        when there is no standby listening to take them (start the worker afresh); one still
        starting up is kept for the next spawn."""
        if not self.listening():
            return None
        proc, self._proc, self._listening = self._proc, None, False
        if proc is None or proc.stdin is None:
            return None
        try:
            self.flags_dir.mkdir(parents=True, exist_ok=True)
            path = self.flags_dir / _key(proc.pid)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps({"argv": list(argv)}))
            partial.replace(path)  # whole or absent, for a hive that reads it meanwhile
            order = {"argv": list(argv), "env": dict(env), "log": str(log_path)}
            proc.stdin.write(json.dumps(order).encode() + b"\n")
            _close_pipes(proc)
        except (OSError, psutil.Error) as exc:
            log.warning("could not hand a worker to the standby (pid %d): %s", proc.pid, exc)
            with contextlib.suppress(OSError):
                proc.kill()
            _close_pipes(proc)
            proc.wait()
            return None
        return proc

    def handed_argv(self, proc: psutil.Process) -> list[str] | None:
        """The flags handed to this process when it was a standby, or None (never handed any:
        a standby still, or not one). The caller checked its command line and mark."""
        try:
            path = self.flags_dir / _key(proc.pid)
            argv = json.loads(path.read_text())["argv"]
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
                    live = path.with_suffix(".json").name == _key(int(pid_text))
                except (ValueError, psutil.Error):
                    live = False
                if not live:
                    with contextlib.suppress(OSError):
                        path.unlink()

    def pid(self) -> int | None:
        """The waiting standby's pid (None: none waits)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """End the waiting standby: it exits at the end of its pipe; killed if it does not."""
        proc, self._proc, self._listening = self._proc, None, False
        if proc is None:
            return
        _close_pipes(proc)
        try:
            proc.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
