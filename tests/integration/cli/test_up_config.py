"""`rbee up` with a cluster file, up to the point where it would start something: which file
it reads, what --dry-run prints, and the clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Invoke

FILE = """
[queen]
port = 7901

[[hive]]
ssh = "me@box2"

[[worker]]
model = "smollm2-135m-instruct"
count = 2
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # A cluster file in the default place must not leak in from the machine running the tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RBEE_CONFIG", raising=False)
    monkeypatch.setenv("RBEE_TOKEN", "t")
    path = tmp_path / "cluster.toml"
    path.write_text(FILE)
    return path


def test_dry_run_prints_the_plan_from_the_file_and_starts_nothing(
    rbee: Invoke, config: Path
) -> None:
    result = rbee("up", "--config", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"rbee up would start (from {config}):",
        "  queen on 0.0.0.0:7901",
        "  hive box2 on me@box2 over SSH, listening on 0.0.0.0:7835, reached at http://box2:7835",
        "    reports to the queen at the address its SSH connection comes from, port 7901",
        "  2 workers of smollm2-135m-instruct on hive box2",
    ]


def test_rbee_config_names_the_file_and_the_default_place_is_read(
    rbee: Invoke, config: Path, tmp_path: Path
) -> None:
    by_env = rbee("up", "--dry-run", env={"RBEE_CONFIG": str(config), "RBEE_TOKEN": "t"})
    assert f"(from {config})" in by_env.output

    default = tmp_path / "home" / ".config" / "rbee" / "cluster.toml"
    default.parent.mkdir(parents=True)
    default.write_text(FILE)
    assert f"(from {default})" in rbee("up", "--dry-run").output


def test_without_a_file_dry_run_shows_the_one_machine_cluster(rbee: Invoke, config: Path) -> None:
    result = rbee("up", "--dry-run", "--workers", "2", "--hive-id", "here")
    assert result.exit_code == 0, result.output
    assert "rbee up would start (from the command line):" in result.output
    assert "  queen on 127.0.0.1:7833" in result.output
    assert "  2 workers of smollm2-135m-instruct on hive here" in result.output


def test_remote_hives_without_a_token_and_flags_the_file_overrides_are_refused(
    rbee: Invoke, config: Path
) -> None:
    no_token = rbee("up", "--config", str(config), env={"RBEE_TOKEN": ""})
    assert no_token.exit_code == 1
    assert "hives on other machines need a cluster token" in no_token.output

    flags = rbee("up", "--config", str(config), "--workers", "3")
    assert flags.exit_code == 1
    assert f"--workers: the cluster file {config} says what to start" in flags.output

    config.write_text('[[hive]]\nssh = "me@box2"\nport = "x"\n')
    bad = rbee("up", "--config", str(config))
    assert bad.exit_code == 1
    assert f"{config} line 3: hive[1].port: Input should be a valid integer" in bad.output

    missing = rbee("up", "--config", str(config.parent / "nope.toml"))
    assert missing.exit_code == 1
    assert "No such file" in missing.output
