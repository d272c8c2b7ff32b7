"""`rbee queen service` and `rbee hive service` against a real systemd user manager: the units
start a queen that answers and a hive that joins it, the token stays in a 0600 file, a hive
restart leaves its workers running (`KillMode=process`), and after a power cut a fresh manager
starts both units by itself and the hive rejoins the queen.

The manager runs in a private mount namespace (see `rbee_testing.user_systemd`); the network is
this machine's, so the test talks to the daemons on loopback.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing import user_systemd
from rbee_testing.processes import console_script, free_port, processes_with_in_argv
from rbee_testing.user_systemd import UserManager

pytestmark = pytest.mark.e2e
RBEE = console_script("rbee")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[UserManager]:
    if reason := user_systemd.unavailable_reason():
        pytest.skip(reason)
    home = tmp_path / "home"
    home.mkdir()
    with UserManager(home, tmp_path / "systemd.log") as box:
        yield box


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if found := check():
                return found
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def test_service_units_run_under_systemd_and_come_back_after_a_reboot(
    manager: UserManager, tmp_path: Path
) -> None:
    token = f"e2e-{secrets.token_hex(16)}"
    queen_port, hive_port, worker_port = free_port(), free_port(), free_port()
    queen = f"http://127.0.0.1:{queen_port}"
    hive = f"http://127.0.0.1:{hive_port}"
    auth = {"Authorization": f"Bearer {token}"}
    cli_env = {"RBEE_TOKEN": token, "RBEE_QUEEN_URL": queen, "COLUMNS": "200"}

    def rbee(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """The CLI as the user runs it in a shell on the systemd machine."""
        return manager.run([RBEE, *args], env=cli_env, timeout_s=timeout_s)

    def hives_online() -> list[str]:
        hives = httpx.get(f"{queen}/v1/hives", headers=auth, timeout=5).json()["hives"]
        return [h["id"] for h in hives if h["online"]]

    def hive_worker_pids() -> list[int]:
        listed = httpx.get(f"{hive}/v1/workers", headers=auth, timeout=5).json()["workers"]
        return [w["pid"] for w in listed]

    # The queen, on every address: that needs the token, which goes to the env file.
    queen_installed = rbee("queen", "service", "--host", "0.0.0.0", "--port", str(queen_port))
    assert queen_installed.returncode == 0, queen_installed.stderr
    assert "rbee-queen.service is enabled and started on this machine" in queen_installed.stdout
    # There is no systemd-logind here: lingering cannot be enabled and the user is told why.
    assert (
        "loginctl enable-linger failed on this machine (Failed to connect to bus: "
        in queen_installed.stdout
    )
    assert "rbee-queen.service starts when the user logs in there, not at boot" in (
        queen_installed.stdout.replace("\n", " ")
    )
    wait_for("the queen answers", lambda: httpx.get(f"{queen}/health", timeout=5).is_success)

    hive_installed = rbee(
        "hive", "service", "--port", str(hive_port), "--hive-id", "sd1",
        "--worker-ports", f"{worker_port}-{worker_port}", "--heartbeat-interval", "1",
    )  # fmt: skip
    assert hive_installed.returncode == 0, hive_installed.stderr
    assert "rbee-hive.service is enabled and started on this machine" in hive_installed.stdout
    wait_for("the hive joins the queen", lambda: hives_online() == ["sd1"])
    assert manager.unit_property("rbee-hive.service", "UnitFileState") == "enabled"
    assert manager.unit_property("rbee-hive.service", "KillMode") == "process"

    # The token: in a 0600 file only, never in a unit or on any command line.
    units = manager.home / ".config" / "systemd" / "user"
    for unit in ("rbee-queen.service", "rbee-hive.service"):
        assert token not in (units / unit).read_text()
    for name in ("queen.env", "hive.env"):
        env_file = manager.home / ".config" / "rbee" / name
        assert env_file.read_text() == f"RBEE_TOKEN={token}\n"
        assert env_file.stat().st_mode & 0o777 == 0o600
    assert processes_with_in_argv(token) == []

    # A worker, then a hive restart: the worker keeps running and the new hive finds it.
    spawned = rbee("worker", "spawn", "-m", DEFAULT_MODEL, "--hive", "sd1", timeout_s=300)
    assert spawned.returncode == 0, spawned.stderr
    [worker_pid] = wait_for("the hive lists its worker", hive_worker_pids)
    hive_pid = manager.unit_property("rbee-hive.service", "MainPID")
    restarted = manager.systemctl("restart", "rbee-hive.service")
    assert restarted.returncode == 0, restarted.stderr
    assert manager.unit_property("rbee-hive.service", "MainPID") != hive_pid
    assert worker_pid in manager.pids()
    assert wait_for("the new hive lists the old worker", hive_worker_pids) == [worker_pid]
    answer = rbee("infer", "Say hello.", "--max-tokens", "8", "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()

    # A power cut, then a boot: the manager starts the enabled units by itself.
    manager.crash()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{queen}/health", timeout=5)
    manager.boot()
    wait_for("the queen answers after the reboot", lambda: httpx.get(f"{queen}/health").is_success)
    wait_for("the hive rejoins after the reboot", lambda: hives_online() == ["sd1"])
    assert manager.unit_property("rbee-queen.service", "ActiveState") == "active"
    assert manager.unit_property("rbee-hive.service", "ActiveState") == "active"
    assert processes_with_in_argv(token) == []
