"""A hive on another machine, driven over SSH: start it detached, stop it, ask about it, read
its log.

On the remote, each hive is known by its port: `$RBEE_STATE_DIR` (default
`~/.cache/rbee/run`) holds `hive-PORT.pid`, `hive-PORT.log` and `hive-PORT.env` (what it was
started with: id, URL, queen URL). A pid is only signalled after its command line shows it is an
rbee-hive, so a reused pid is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from rbee.cli import processes
from rbee.cli.context import CliError
from rbee.cli.ssh import Result, Ssh, SshTarget, quote
from rbee.clients.hive import HiveClient
from rbee.clients.queen import QueenClient, QueenError
from rbee.common.tokens import is_loopback

DEFAULT_PORT = 7835
JOIN_POLL_S = 0.25
ALIVE_CHECK_S = 2.0
# Exit codes of our scripts (ssh itself uses 255).
NOT_FOUND, EXITED, NO_STATE_DIR, NOT_RUNNING = 10, 11, 12, 20

PRELUDE = """set -u
dir="${{RBEE_STATE_DIR:-$HOME/.cache/rbee/run}}"
pidf="$dir/hive-{port}.pid"
log="$dir/hive-{port}.log"
rec="$dir/hive-{port}.env"
is_hive() {{
  if [ -r "/proc/$1/cmdline" ]; then tr '\\000' ' ' <"/proc/$1/cmdline" | grep -q rbee-hive
  else ps -p "$1" -o args= 2>/dev/null | grep -q rbee-hive; fi
}}
running() {{ [ -f "$pidf" ] && pid=$(cat "$pidf") && [ -n "$pid" ] && is_hive "$pid"; }}
"""

# The token arrives inside this script, on the SSH channel's stdin, and reaches the hive only
# through its environment. The whole script is one { } group so sh has read all of it before
# running anything.
START = """{{
{prelude}
mkdir -p "$dir" || {{ echo "cannot create $dir"; exit {no_state_dir}; }}
if running; then echo "rbee: already $pid"; cat "$rec" 2>/dev/null; exit 0; fi
prog={remote_command}
if [ -z "$prog" ]; then
  prog=$(command -v rbee-hive 2>/dev/null) || prog="$HOME/.local/bin/rbee-hive"
fi
case "$prog" in "~/"*) prog="$HOME/${{prog#"~/"}}" ;; esac
if ! command -v "$prog" >/dev/null 2>&1; then
  echo "rbee-hive not found on $(hostname) (looked for $prog; install it with \\`rbee hive install --ssh\\` or pass --remote-command)"
  exit {not_found}
fi
queen={queen_url}
if [ -z "$queen" ]; then
  client=${{SSH_CONNECTION%% *}}
  case "$client" in *:*) client="[$client]" ;; esac
  queen="{queen_scheme}://$client:{queen_port}"
fi
{token_line}
umask 077
echo "--- $(date -u '+%Y-%m-%dT%H:%M:%SZ') rbee hive start" >>"$log"
detach=
if command -v setsid >/dev/null 2>&1; then detach=setsid; fi
$detach nohup "$prog" --queen-url "$queen" {args} </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid" >"$pidf"
printf 'pid=%s\\nhive_id=%s\\nurl=%s\\nqueen_url=%s\\n' "$pid" {hive_id} {url} "$queen" >"$rec"
sleep 1
if ! is_hive "$pid"; then
  echo "rbee-hive exited at once:"; tail -n 5 "$log"; rm -f "$pidf"; exit {exited}
fi
echo "rbee: started $pid"; cat "$rec"
}}
"""

STATUS = """{{
{prelude}
if running; then echo "rbee: running $pid"; else echo "rbee: stopped"; fi
cat "$rec" 2>/dev/null
exit 0
}}
"""

STOP = """{{
{prelude}
if ! running; then rm -f "$pidf" "$rec"; echo "rbee: not-running"; exit {not_running}; fi
kill -TERM "$pid"
i=0
while is_hive "$pid" && [ "$i" -lt {ticks} ]; do sleep 0.2 2>/dev/null || sleep 1; i=$((i + 1)); done
if is_hive "$pid"; then kill -KILL "$pid"; echo "rbee: killed $pid"; else echo "rbee: stopped $pid"; fi
rm -f "$pidf" "$rec"
}}
"""

LOGS = """{{
{prelude}
if [ ! -f "$log" ]; then echo "no log at $log"; exit {not_running}; fi
tail -n {lines} "$log"
}}
"""


def _default_id(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", host).strip("-.")[:128] or "hive"


@dataclass(frozen=True)
class RemoteHive:
    """One hive to run on `target`, and how the queen and the hive find each other."""

    target: SshTarget
    port: int = DEFAULT_PORT
    hive_id: str | None = None
    advertise_host: str | None = None
    remote_command: str | None = None
    queen_url: str | None = None  # as the remote reaches it; None: see `start`
    host: str = "0.0.0.0"
    worker_ports: str | None = None
    models_dir: str | None = None
    heartbeat_interval: float | None = None
    memory_limit: int | None = None  # bytes

    @property
    def id(self) -> str:
        return self.hive_id or _default_id(self.target.host)

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.target.host

    @property
    def url(self) -> str:
        return str(httpx.URL(scheme="http", host=self.public_host, port=self.port)).rstrip("/")

    def hive_args(self) -> list[str]:
        return processes.hive_argv(
            queen_url=None,  # the start script adds the one the remote reaches
            host=self.host,
            port=self.port,
            hive_id=self.id,
            advertise_host=self.public_host,
            models_dir=self.models_dir,
            worker_ports=self.worker_ports,
            heartbeat_interval=self.heartbeat_interval,
            memory_limit=self.memory_limit,
        )

    def start_script(self, cli_queen_url: str, token: str | None) -> str:
        """The queen URL is --queen-url if given, else the CLI's; one on loopback would mean the
        remote itself, so the remote uses the address it sees our SSH connection come from."""
        parsed = httpx.URL(self.queen_url or cli_queen_url)
        queen_url = str(parsed).rstrip("/")
        if self.queen_url is None and is_loopback(parsed.host):
            queen_url = ""  # the script fills in the SSH client's address
        return START.format(
            prelude=PRELUDE.format(port=self.port),
            remote_command=quote(self.remote_command),
            queen_url=quote(queen_url),
            queen_scheme=parsed.scheme,
            queen_port=parsed.port or (443 if parsed.scheme == "https" else 80),
            token_line=f"RBEE_TOKEN={quote(token)}; export RBEE_TOKEN"
            if token
            else "unset RBEE_TOKEN",
            args=" ".join(quote(a) for a in self.hive_args()),
            hive_id=quote(self.id),
            url=quote(self.url),
            not_found=NOT_FOUND,
            exited=EXITED,
            no_state_dir=NO_STATE_DIR,
        )


def parse_record(text: str) -> dict[str, str]:
    """`key=value` lines (what the remote recorded) and the `rbee: WORD [PID]` line."""
    record: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("rbee: "):
            word, _, pid = line[6:].partition(" ")
            record["state"] = word
            if pid:
                record["pid"] = pid
        elif "=" in line:
            key, _, value = line.partition("=")
            record.setdefault(key.strip(), value.strip())
    return record


@dataclass
class Started:
    pid: int
    queen_url: str
    already: bool


async def start(ssh: Ssh, hive: RemoteHive, cli_queen_url: str, token: str | None) -> Started:
    """Launch it detached; raises CliError with the reason in one line."""
    result = await ssh.run(hive.start_script(cli_queen_url, token))
    if reason := ssh.failure(result):
        raise CliError(reason)
    if result.code == NOT_FOUND:
        raise CliError(result.last_lines(1))
    if result.code == EXITED:
        raise CliError(f"rbee-hive on {ssh.where} exited at once: {_tail(result)}")
    if result.code != 0:
        output = result.last_lines() or result.last_lines(stderr=True)
        raise CliError(f"starting rbee-hive on {ssh.where} failed: {output}")
    record = parse_record(result.out)
    return Started(
        int(record.get("pid", "0")), record.get("queen_url", ""), record.get("state") == "already"
    )


def _tail(result: Result) -> str:
    lines = [ln.strip() for ln in result.out.splitlines()[1:] if ln.strip()]
    return " / ".join(lines[-3:]) or "no output"


async def status(ssh: Ssh, port: int) -> dict[str, str]:
    """The remote's record: `state` is running or stopped; pid, hive_id, url, queen_url."""
    result = await ssh.run(STATUS.format(prelude=PRELUDE.format(port=port)))
    if reason := ssh.failure(result):
        raise CliError(reason)
    return parse_record(result.out)


async def logs(ssh: Ssh, port: int, lines: int) -> str:
    result = await ssh.run(
        LOGS.format(prelude=PRELUDE.format(port=port), lines=lines, not_running=NOT_RUNNING)
    )
    if reason := ssh.failure(result):
        raise CliError(reason)
    if result.code != 0:
        raise CliError(f"{ssh.where}: {result.last_lines(1)}")
    return result.out


async def stop(ssh: Ssh, port: int, grace_s: float = 10.0) -> str:
    """SIGTERM, then SIGKILL after `grace_s`. Returns stopped, killed or not-running."""
    result = await ssh.run(
        STOP.format(
            prelude=PRELUDE.format(port=port),
            ticks=max(1, int(grace_s * 5)),
            not_running=NOT_RUNNING,
        ),
        timeout_s=grace_s + 30,
    )
    if reason := ssh.failure(result):
        raise CliError(reason)
    return parse_record(result.out).get("state", "not-running")


async def stop_workers(hive_url: str, token: str | None) -> list[int]:
    """Stop every worker of the hive through its own API (it proves which are its own)."""
    async with HiveClient(hive_url, token=token, timeout=10.0) as hive:
        workers = await hive.workers()
        await asyncio.gather(*(hive.stop_worker(w.pid) for w in workers))
    return [w.pid for w in workers]


async def wait_joined(
    ssh: Ssh,
    hive: RemoteHive,
    queen: QueenClient,
    started: Started,
    timeout_s: float,
    on_wait: Callable[[], None] | None = None,
) -> None:
    """Until the queen lists the hive online; fail early (with its log tail) if it exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    next_check = loop.time() + ALIVE_CHECK_S
    while True:
        with contextlib.suppress(QueenError):
            if any(h.id == hive.id and h.online for h in await queen.hives()):
                return
        now = loop.time()
        if now >= next_check or now >= deadline:
            next_check = now + ALIVE_CHECK_S
            record = await status(ssh, hive.port)
            if record.get("state") != "running":
                tail = await _log_tail(ssh, hive.port)
                raise CliError(f"rbee-hive on {ssh.where} exited: {tail}")
            if now >= deadline:
                tail = await _log_tail(ssh, hive.port)
                cause = (
                    f"it cannot reach the queen at {started.queen_url}"
                    if "not reachable" in tail
                    else "it has not joined the queen"
                )
                raise CliError(
                    f"rbee-hive on {ssh.where} runs (pid {started.pid}) but {cause} "
                    f"after {timeout_s:.0f}s: {tail}"
                )
        if on_wait is not None:
            on_wait()
        await asyncio.sleep(JOIN_POLL_S)


async def _log_tail(ssh: Ssh, port: int) -> str:
    try:
        text = await logs(ssh, port, 3)
    except CliError as exc:
        return str(exc)
    return " / ".join(line.strip() for line in text.splitlines() if line.strip()) or "empty log"


async def queen_sees(queen: QueenClient, hive_id: str) -> bool | None:
    """Whether the queen lists the hive online; None when the queen cannot be asked."""
    try:
        return any(h.id == hive_id and h.online for h in await queen.hives())
    except QueenError:
        return None
