"""systemd user units for the hive and the queen: the unit text, and the commands the install
script issues (run for real by `sh`, with `systemctl` and `loginctl` stand-ins that record their
arguments: this machine has no systemd user session)."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from rbee.cli import services
from rbee.cli.context import CliError
from rbee.cli.processes import hive_argv
from rbee.cli.ssh import Shell

HIVE = services.Service(
    name="rbee-hive",
    unit="rbee-hive.service",
    description="rbee-hive, reporting to the rbee queen at http://10.0.0.1:7833",
    args=tuple(
        hive_argv(
            queen_url="http://10.0.0.1:7833",
            host="0.0.0.0",
            port=7835,
            hive_id="box2",
            advertise_host="10.0.0.2",
        )
    ),
    env_file="hive.env",
)


def test_the_hive_unit_runs_the_hive_with_its_flags_and_reads_the_token_from_a_file() -> None:
    text = HIVE.unit_text("/home/me/.local/bin/rbee-hive")
    assert text.splitlines() == [
        "[Unit]",
        "Description=rbee-hive, reporting to the rbee queen at http://10.0.0.1:7833",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "EnvironmentFile=-%h/.config/rbee/hive.env",
        "ExecStart=/home/me/.local/bin/rbee-hive --queen-url http://10.0.0.1:7833 --host 0.0.0.0 "
        "--port 7835 --hive-id box2 --advertise-host 10.0.0.2",
        "Restart=on-failure",
        "RestartSec=5",
        "KillMode=process",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]


def test_odd_arguments_are_quoted_for_systemd() -> None:
    assert services.systemd_quote("/opt/my apps/rbee-hive") == '"/opt/my apps/rbee-hive"'
    assert services.systemd_quote("50%") == "50%%"
    assert services.systemd_quote('a"b$c') == '"a\\"b$$c"'


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME in a temporary place, and systemctl/loginctl that log their arguments."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    for name in ("systemctl", "loginctl"):
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho "{name} $*" >>"{tmp_path}/calls"\n'
            f'[ -z "${{FAIL_{name.upper()}:-}}" ] || {{ echo "Failed to connect to bus" >&2; exit 1; }}\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return home


def calls(home: Path) -> list[str]:
    return (home.parent / "calls").read_text().splitlines()


async def test_install_writes_the_unit_and_a_private_token_file_then_enables_it(
    fake_home: Path,
) -> None:
    notes = await services.install(Shell(), HIVE, "/usr/bin/rbee-hive", "s3cret token")

    unit = fake_home / ".config" / "systemd" / "user" / "rbee-hive.service"
    assert unit.read_text() == HIVE.unit_text("/usr/bin/rbee-hive")
    assert "s3cret" not in unit.read_text()
    env_file = fake_home / ".config" / "rbee" / "hive.env"
    assert env_file.read_text() == "RBEE_TOKEN=s3cret token\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    user = pwd.getpwuid(os.getuid()).pw_name
    assert calls(fake_home) == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now rbee-hive.service",
        f"loginctl enable-linger {user}",
    ]
    assert notes == ["rbee-hive.service is enabled and started on this machine"]
    assert "s3cret" not in HIVE.install_script("/usr/bin/rbee-hive", None)


async def test_a_refused_linger_is_a_note_and_a_failing_systemctl_an_error(
    fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_LOGINCTL", "1")
    notes = await services.install(Shell(), HIVE, "/usr/bin/rbee-hive", None)
    assert notes[1] == (
        "loginctl enable-linger failed on this machine (Failed to connect to bus): without "
        "lingering, rbee-hive.service starts when the user logs in there, not at boot; "
        "`loginctl enable-linger USER` (as root if it is refused) fixes that"
    )
    assert not (fake_home / ".config" / "rbee" / "hive.env").exists()

    monkeypatch.setenv("FAIL_SYSTEMCTL", "1")
    with pytest.raises(CliError) as failed:
        await services.install(Shell(), HIVE, "/usr/bin/rbee-hive", None)
    assert str(failed.value) == (
        "wrote the unit rbee-hive.service on this machine, but systemctl --user failed there: "
        "Failed to connect to bus"
    )


async def test_resolve_finds_the_program_or_says_it_is_missing(
    fake_home: Path, tmp_path: Path
) -> None:
    program = tmp_path / "bin" / "rbee-hive"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    found = await services.resolve(Shell(), "rbee-hive", None)
    assert found["program"] == str(program)

    with pytest.raises(CliError, match=r"rbee-hive not found on .*--remote-command"):
        await services.resolve(Shell(), "rbee-hive", str(tmp_path / "nope"))
