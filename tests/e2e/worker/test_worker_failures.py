"""Broken model files and bad requests against real worker processes (tiny written models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_testing.gguf import write_garbage_gguf, write_truncated_gguf

from .conftest import SMOLLM

pytestmark = pytest.mark.e2e


def assert_one_line_error_naming(output: str, path: Path) -> None:
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    assert str(path) in errors[0]
    assert "Traceback" not in output


def test_missing_model_file_is_a_one_line_error(
    queen_module: Any, run_worker: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.gguf"
    code, output = run_worker(queen_module.url, str(missing))
    assert code != 0
    assert_one_line_error_naming(output, missing)
    assert "does not exist" in output


def test_a_file_that_is_not_gguf_is_a_one_line_error(
    queen_module: Any, run_worker: Any, tmp_path: Path
) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    code, output = run_worker(queen_module.url, str(text))
    assert code != 0
    assert_one_line_error_naming(output, text)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_is_a_one_line_error_after_start(
    damage: str, queen_module: Any, run_worker: Any, tiny_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        write_truncated_gguf(broken, tiny_model)
    else:
        write_garbage_gguf(broken)
    code, output = run_worker(queen_module.url, str(broken))
    assert code != 0
    assert_one_line_error_naming(output, broken)


def test_tiny_written_model_serves_and_refuses_a_prompt_longer_than_its_context(
    cluster: Any, queen_module: Any, tiny_model: Path
) -> None:
    worker = cluster.worker(queen_module.url, "--ctx-size", "128", model=str(tiny_model))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "héllo wörld"}]}
    ok = httpx.post(f"{worker.url}/v1/chat/completions", json={**chat, "max_tokens": 5}, timeout=30)
    assert ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] >= 1
    long = {**chat, "messages": [{"role": "user", "content": "x " * 200}]}
    refused = httpx.post(f"{worker.url}/v1/chat/completions", json=long, timeout=30)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "128 tokens" in error["message"]
    bad = httpx.post(f"{worker.url}/v1/chat/completions", json={"model": "tiny"}, timeout=30)
    assert bad.status_code == 400
    assert httpx.get(f"{worker.url}/health").status_code == 200


def test_listening_beyond_loopback_without_a_token_is_refused(
    queen_module: Any, run_worker: Any, tiny_model: Path
) -> None:
    code, output = run_worker(queen_module.url, str(tiny_model), "--host", "0.0.0.0")
    assert code != 0
    assert "refusing to listen on 0.0.0.0" in output


TOOLS: dict[str, Any] = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
}
JSON_SCHEMA: dict[str, Any] = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }
}


def test_too_long_prompts_are_refused_before_streaming_and_answers_stop_at_the_context(
    cluster: Any, queen_module: Any
) -> None:
    """llama.cpp counts the prompt as it generates: a prompt that does not fit is still a 400
    (never a stream that breaks), streamed or not, chat or text; an answer with no max_tokens
    runs to the end of its slot's context and says `length`."""
    worker = cluster.worker(queen_module.url, "--ctx-size", "96", "--slots", "2")
    long_text = "lighthouse " * 200
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": long_text}], "stream": True},
        ),
        ("/v1/completions", {"prompt": long_text}),
        ("/v1/completions", {"prompt": long_text, "stream": True}),
        # A JSON schema made from tools or given as response_format is not at fault.
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}], **TOOLS}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": long_text}], **JSON_SCHEMA},
        ),
    ]:
        refused = httpx.post(f"{worker.url}{path}", json={"model": SMOLLM, **body}, timeout=60)
        assert refused.status_code == 400, (path, body.get("stream"), refused.text)
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded", error
        assert error["param"] not in ("tools", "response_format"), error
        assert "maximum context length is 96 tokens" in error["message"]
    # Both end-of-text tokens banned, greedy: nothing stops it but the context.
    endless = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Count from one to a hundred."}],
        "temperature": 0,
        "logit_bias": {"0": -100, "2": -100},
    }
    answer = httpx.post(f"{worker.url}/v1/chat/completions", json=endless, timeout=120).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    usage = answer["usage"]
    assert 90 <= usage["prompt_tokens"] + usage["completion_tokens"] <= 96
    assert httpx.get(f"{worker.url}/health").status_code == 200
