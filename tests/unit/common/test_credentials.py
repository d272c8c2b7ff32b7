"""Secrets stay off command lines and out of workers; expired keys stop working."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.common.serve import parse_settings
from rbee.hive.supervisor import SPAWN_MARKER
from rbee.hive.worker_launch import worker_env
from rbee.queen.keys import KeyStore
from rbee.queen.settings import QueenSettings


def test_a_token_on_the_command_line_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--token", "s3cret"], ["--token=s3cret"]):
        with pytest.raises(SystemExit) as exited:
            parse_settings(QueenSettings, "queen-rbee", argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "RBEE_TOKEN" in err
        assert "--token-file" in err
        assert "s3cret" not in err


def test_the_token_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert (
        parse_settings(QueenSettings, "q", ["--token-file", str(token_file)]).token == "from-file"
    )
    monkeypatch.setenv("RBEE_TOKEN", "from-env")
    assert parse_settings(QueenSettings, "q", []).token == "from-env"
    assert "from-env" not in repr(parse_settings(QueenSettings, "q", []))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
        (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
    ],
)
def test_bad_credential_settings_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(QueenSettings, "queen-rbee", argv)
    assert message in capsys.readouterr().err


def test_a_spawned_worker_gets_only_what_it_needs() -> None:
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "LC_ALL": "C.UTF-8",
        "SSL_CERT_FILE": "/ca.pem",
        "OMP_NUM_THREADS": "2",
        "HF_TOKEN": "hf_secret",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "RBEE_HIVE_PORT": "7835",
        "RBEE_TOKEN": "old",
        "RBEE_TEST_RUN": "run-1",  # the test suite's mark: its leak check sees the workers
    }
    env = worker_env(parent, "hive-a", "cluster")
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "LC_ALL": "C.UTF-8",
        "SSL_CERT_FILE": "/ca.pem",
        "OMP_NUM_THREADS": "2",
        "RBEE_TEST_RUN": "run-1",
        SPAWN_MARKER: "hive-a",
        "RBEE_TOKEN": "cluster",
    }
    assert "RBEE_TOKEN" not in worker_env(parent, "hive-a", None)


def test_an_expired_key_stops_working(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = KeyStore(tmp_path, clock=lambda: now[0])
    key = store.create("temp", expires_days=1).key.encode()
    assert store.identify(key) == "temp"
    now[0] += 86400 + 1
    assert store.identify(key) is None
    store.close()
