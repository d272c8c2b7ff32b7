"""A second machine with a real OpenSSH server: a network namespace on a test LAN, sshd with a
throwaway host key, and a throwaway user key that only this test's `RBEE_SSH_COMMAND` uses.

The namespace shares this filesystem, so the remote `rbee-hive` is this environment's own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rbee_testing import netns, user_systemd
from rbee_testing.processes import console_script, run_mark
from rbee_testing.user_systemd import UserManager

SSHD = "/usr/sbin/sshd"


def unavailable() -> str | None:
    if reason := netns.unavailable_reason():
        return reason
    for program in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if program is None or not Path(program).exists():
            return "OpenSSH (openssh-server, openssh-client) is not installed"
    return None


@dataclass
class Box:
    """The remote machine: where it is, how to log in, and where its rbee files go."""

    lan: netns.Lan
    name: str
    address: str
    target: str  # USER@HOST for --ssh
    ssh_command: str  # for RBEE_SSH_COMMAND
    state_dir: Path  # the remote's RBEE_STATE_DIR
    home: Path
    systemd: UserManager | None = None  # its systemd user manager, when asked for one

    def rbee_processes(self) -> list[psutil.Process]:
        """rbee daemons and workers running inside the box's namespace."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.lan.namespace(self.name)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        found = []
        for pid in pids:
            try:
                proc = psutil.Process(int(pid))
                cmdline = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
                continue
            if ("rbee-hive" in cmdline or "llm-worker-rbee" in cmdline) and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        return found

    def serving_processes(self) -> list[psutil.Process]:
        """The hive and its workers, without the hive's standby (`--standby` with no
        llama-server of its own: it serves nothing; its children are the workers it forked)."""
        serving = []
        for proc in self.rbee_processes():
            try:
                idle_standby = "--standby" in proc.cmdline() and not any(
                    "llama-server" in child.name() for child in proc.children()
                )
            except psutil.NoSuchProcess:
                continue
            if not idle_standby:
                serving.append(proc)
        return serving


def _wait_listening(lan: netns.Lan, host: str, port: int, sshd: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sshd.poll() is not None:
            raise RuntimeError(f"sshd exited {sshd.returncode}")
        done = lan.run(host, ["ss", "-Htln", f"sport = :{port}"], check=False)
        if done.stdout.strip():
            return
        time.sleep(0.1)
    raise TimeoutError("sshd did not listen within 20s")


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    if reason := unavailable():
        pytest.skip(reason)
    with open_box(tmp_path) as opened:
        yield opened


@pytest.fixture
def systemd_box(tmp_path: Path) -> Iterator[Box]:
    """The box with a real systemd user manager: its sshd and the manager share a private
    mount namespace (see `rbee_testing.user_systemd`), so `systemctl --user` over SSH works."""
    if reason := unavailable() or user_systemd.unavailable_reason():
        pytest.skip(reason)
    with open_box(tmp_path, systemd=True) as opened:
        yield opened


@contextlib.contextmanager
def open_box(tmp_path: Path, *, systemd: bool = False) -> Iterator[Box]:
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
        )
    (keys / "authorized_keys").write_text((keys / "user_key.pub").read_text())
    home, state_dir = tmp_path / "remote-home", tmp_path / "remote-run"
    home.mkdir()
    (home / ".local" / "bin").mkdir(parents=True)
    # The remote's rbee files go under the test's temporary directory, as a remote user's
    # environment would place them under their home.
    setenv = " ".join(
        [
            f"HOME={home}",
            f"RBEE_STATE_DIR={state_dir}",
            f"RBEE_HIVE_LOG_DIR={home / 'logs'}",
            f"RBEE_HIVE_MODELS_DIR={home / 'models'}",
            # The box has no route to a package index: pip uses only the wheels given to it.
            "PIP_NO_INDEX=1",
            # So the test run can tell what it started.
            *(f"{k}={v}" for k, v in run_mark().items()),
        ]
        # What pam_systemd would set at login: where the user manager's sockets are.
        + ([f"XDG_RUNTIME_DIR={user_systemd.RUNTIME_DIR}"] if systemd else [])
    )
    config = keys / "sshd_config"
    with (
        netns.Lan(["box1"]) as lan,
        (tmp_path / "sshd.log").open("w") as sshd_log,
        contextlib.ExitStack() as machine,
    ):
        manager = None
        if systemd:
            manager = machine.enter_context(
                UserManager(
                    home,
                    tmp_path / "systemd.log",
                    # Not `ip netns exec`: that mounts a /sys without the cgroups systemd needs.
                    launcher=["nsenter", f"--net=/run/netns/{lan.namespace('box1')}"],
                )
            )
        address = lan.address("box1")
        config.write_text(
            f"ListenAddress {address}\n"
            "Port 22\n"
            f"HostKey {keys / 'host_key'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "StrictModes no\n"
            "UsePAM no\n"
            f"PidFile {keys / 'sshd.pid'}\n"
            f"SetEnv {setenv}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sshd = lan.popen(
            "box1",
            manager.enter([SSHD, "-D", "-e", "-f", str(config)])
            if manager
            else [SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=sshd_log,
        )
        _wait_listening(lan, "box1", 22, sshd)
        ssh_command = shlex.join(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                str(keys / "user_key"),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                f"UserKnownHostsFile={keys / 'known_hosts'}",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "BatchMode=yes",
            ]
        )
        user = pwd.getpwuid(os.getuid()).pw_name
        yield Box(lan, "box1", address, f"{user}@{address}", ssh_command, state_dir, home, manager)


@pytest.fixture
def token() -> str:
    """A cluster token to look for in every process's command line."""
    return f"e2e-{secrets.token_hex(16)}"


def remote_hive_command() -> str:
    return console_script("rbee-hive")
