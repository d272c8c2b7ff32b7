"""`rbee hive service [--ssh USER@HOST]`, `rbee queen service`: systemd user units, so a daemon
comes back after a reboot.

The unit runs the daemon with its flags; the cluster token sits in an environment file
(`~/.config/rbee/NAME.env`, mode 0600) that the unit reads, never in the unit or a command line.
`KillMode=process`: stopping or restarting the hive leaves its workers running, as `rbee hive
stop --keep-workers` does (they run in sessions of their own and the hive finds them again when it starts).
Installing writes both files, then `systemctl --user daemon-reload` and `enable --now`, and asks
`loginctl enable-linger` so the units start at boot without a login.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rbee.cli.context import CliError
from rbee.cli.ssh import Shell, quote

UNIT_DIR = "$HOME/.config/systemd/user"
ENV_DIR = "$HOME/.config/rbee"
RESOLVE_FAILED = 10
LINGER_REFUSED = "rbee: linger-refused:"
SAFE_ARG = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")

# Where the daemon's program is, and (over SSH, when asked) where the queen is as the remote
# sees this machine: the client address of the SSH connection.
RESOLVE = """{{
prog={program}
if [ -z "$prog" ]; then
  prog=$(command -v {name} 2>/dev/null) || prog="$HOME/.local/bin/{name}"
fi
case "$prog" in "~/"*) prog="$HOME/${{prog#"~/"}}" ;; esac
case "$prog" in /*) ;; *) prog=$(command -v "$prog" 2>/dev/null) || prog= ;; esac
if [ -z "$prog" ] || [ ! -x "$prog" ]; then
  echo "{name} not found on $(hostname) (install it with \\`rbee hive install --ssh\\` or pass --remote-command)"
  exit {failed}
fi
echo "program=$prog"
client=${{SSH_CONNECTION%% *}}
case "$client" in *:*) client="[$client]" ;; esac
echo "client=$client"
echo "user=$(id -un)"
}}
"""

INSTALL = """{{
set -eu
umask 077
mkdir -p "{unit_dir}" "{env_dir}"
cat >"{unit_dir}/{unit}" <<'RBEE_UNIT_END'
{unit_text}RBEE_UNIT_END
{env_line}
echo "rbee: wrote {unit_dir}/{unit}"
if ! command -v systemctl >/dev/null 2>&1; then echo "rbee: no systemctl on $(hostname)"; exit 21; fi
systemctl --user daemon-reload
systemctl --user enable --now {unit}
if ! linger=$(loginctl enable-linger "$(id -un)" 2>&1); then
  echo "rbee: linger-refused: $(printf '%s' "$linger" | tail -n 1)"
fi
echo "rbee: enabled {unit}"
}}
"""


def systemd_quote(arg: str) -> str:
    """One ExecStart argument: bare when plain, else in double quotes with escapes. `%` and `$`
    are doubled so systemd expands neither."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if SAFE_ARG.match(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Service:
    """A daemon to run as a systemd user unit."""

    name: str  # the program: rbee-hive or queen-rbee
    unit: str  # rbee-hive.service
    description: str
    args: tuple[str, ...]  # the daemon's flags
    env_file: str  # e.g. hive.env under ~/.config/rbee

    def unit_text(self, program: str) -> str:
        exec_start = " ".join(systemd_quote(a) for a in (program, *self.args))
        return (
            "[Unit]\n"
            f"Description={self.description}\n"
            "Wants=network-online.target\n"
            "After=network-online.target\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            f"EnvironmentFile=-%h/.config/rbee/{self.env_file}\n"
            f"ExecStart={exec_start}\n"
            "Restart=on-failure\n"
            "RestartSec=5\n"
            "KillMode=process\n"
            "\n"
            "[Install]\n"
            "WantedBy=default.target\n"
        )

    def install_script(self, program: str, token: str | None) -> str:
        if token:
            env_line = (
                f"printf 'RBEE_TOKEN=%s\\n' {quote(token)} >\"{ENV_DIR}/{self.env_file}\"\n"
                f'chmod 600 "{ENV_DIR}/{self.env_file}"'
            )
        else:
            env_line = f'rm -f "{ENV_DIR}/{self.env_file}"'
        return INSTALL.format(
            unit_dir=UNIT_DIR,
            env_dir=ENV_DIR,
            unit=self.unit,
            unit_text=self.unit_text(program),
            env_line=env_line,
        )


async def resolve(shell: Shell, name: str, program: str | None) -> dict[str, str]:
    """The absolute path of the daemon's program there, the SSH client address, the user."""
    script = RESOLVE.format(program=quote(program), name=name, failed=RESOLVE_FAILED)
    result = await shell.run(script)
    if reason := shell.failure(result):
        raise CliError(reason)
    if result.code != 0:
        raise CliError(result.last_lines(1) or f"could not find {name} on {shell.where}")
    found = {}
    for line in result.out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


async def install(shell: Shell, service: Service, program: str, token: str | None) -> list[str]:
    """Write the unit and the token file, enable and start it. Returns notes for the user."""
    result = await shell.run(service.install_script(program, token), timeout_s=120)
    if reason := shell.failure(result):
        raise CliError(reason)
    wrote = "rbee: wrote" in result.out
    if result.code != 0:
        what = result.last_lines(2, stderr=True) or result.last_lines(2)
        prefix = f"wrote the unit {service.unit} on {shell.where}, but " if wrote else ""
        raise CliError(f"{prefix}systemctl --user failed there: {what}")
    notes = [f"{service.unit} is enabled and started on {shell.where}"]
    for line in result.out.splitlines():
        if line.startswith(LINGER_REFUSED):
            why = line.removeprefix(LINGER_REFUSED).strip() or "no reason given"
            notes.append(
                f"loginctl enable-linger failed on {shell.where} ({why}): without lingering, "
                f"{service.unit} starts when the user logs in there, not at boot; "
                "`loginctl enable-linger USER` (as root if it is refused) fixes that"
            )
    return notes
