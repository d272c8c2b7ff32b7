"""The command line as a user types it, and what the worker makes of it."""

from __future__ import annotations

import pytest

from rbee.common.serve import parse_settings
from rbee.worker.app import default_model_id, identity_from
from rbee.worker.settings import WorkerSettings

REQUIRED = ["--model", "smollm2-135m-instruct", "--port", "8080", "--queen-url", "http://q:7833"]


def test_flags_are_kebab_case_and_defaults_are_safe() -> None:
    settings = parse_settings(WorkerSettings, "llm-worker-rbee", [*REQUIRED, "--slots", "2"])
    assert settings.slots == 2
    assert settings.host == "127.0.0.1"
    assert settings.heartbeat_interval == 30
    assert settings.ctx_size == 2048


def test_token_comes_from_rbee_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_TOKEN", "t0k")
    assert parse_settings(WorkerSettings, "llm-worker-rbee", REQUIRED).token == "t0k"


def test_bad_flag_value_is_a_one_line_error_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(WorkerSettings, "llm-worker-rbee", [*REQUIRED, "--slots", "0"])
    assert exited.value.code == 2
    assert "--slots" in capsys.readouterr().err


def test_each_worker_without_an_id_gets_a_unique_one() -> None:
    settings = WorkerSettings.model_validate(
        {"model": "smollm2-135m-instruct", "port": 8080, "queen_url": "http://q"}
    )
    assert identity_from(settings).worker_id != identity_from(settings).worker_id


def test_advertised_host_defaults_to_the_bind_host() -> None:
    base = {"model": "/m/x.gguf", "port": 8080, "queen_url": "http://q", "host": "10.0.0.2"}
    assert identity_from(WorkerSettings.model_validate(base)).host == "10.0.0.2"
    advertised = WorkerSettings.model_validate({**base, "advertise_host": "gpu1.lan"})
    assert identity_from(advertised).host == "gpu1.lan"


def test_model_id_is_the_bundled_name_or_the_file_stem() -> None:
    assert default_model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert default_model_id("/models/llama-3-8b.Q4_K_M.gguf") == "llama-3-8b.Q4_K_M"


def test_queen_url_must_be_http(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "m.gguf", "--port", "8080", "--queen-url", "queen:7833"]
    with pytest.raises(SystemExit):
        parse_settings(WorkerSettings, "llm-worker-rbee", args)
    assert "--queen-url" in capsys.readouterr().err
