"""What the worker asks of llama-server, and how its answers and refusals reach the client."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbee.worker.app import kv_cache_type, llama_server, resolve_model
from rbee.worker.engines.base import EngineError, Prompt, PromptError, PromptTooLong, SamplingParams
from rbee.worker.engines.gguf import read_model_facts
from rbee.worker.engines.llama_process import ServerConfig
from rbee.worker.engines.llama_server import (
    completion_body,
    read_stream,
    refusal,
    schema_refusal,
    scored_tokens,
)
from rbee.worker.settings import WorkerSettings
from rbee_testing.gguf import write_tiny_gguf


def test_a_request_carries_its_prompt_and_every_sampling_setting() -> None:
    params = SamplingParams(
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop=("\n",),
        json_schema={"type": "object"},
        logprobs=0,
        logit_bias={42: -100.0},
    )
    body = completion_body(Prompt(text="<|im_start|>user", stop=("<|im_end|>",)), params)
    assert (body["prompt"], body["n_predict"], body["stream"]) == ("<|im_start|>user", 5, True)
    assert (body["temperature"], body["top_p"], body["seed"]) == (0, 0.5, 7)
    assert body["stop"] == ["\n", "<|im_end|>"]
    assert body["json_schema"] == {"type": "object"}
    assert body["logit_bias"] == [[42, -100.0]]
    assert body["n_probs"] == 20  # always the same, cut to what was asked afterwards
    # A seeded or scored request decodes its prompt afresh: the same text, the same scores.
    assert body["cache_prompt"] is False
    scored = completion_body(Prompt(text="a"), SamplingParams(logprobs=2))
    assert scored["cache_prompt"] is False


def test_unset_options_are_left_out() -> None:
    body = completion_body(Prompt(text="a"), SamplingParams())
    assert not {"seed", "json_schema", "logit_bias", "n_probs"} & set(body)
    # Any other request reuses the prefix a slot holds (what prefix routing counts on).
    assert body["cache_prompt"] is True
    # No max_tokens: the answer may run to the end of its slot's context (llama.cpp stops it).
    assert body["n_predict"] == -1


def test_token_scores_keep_bytes_and_only_the_asked_alternatives() -> None:
    probs = [
        {
            "id": 9,
            "token": "Par",
            "bytes": [80, 97, 114],
            "logprob": -0.1,
            "top_logprobs": [
                {"id": 9, "token": "Par", "bytes": [80, 97, 114], "logprob": -0.1},
                {"id": 3, "token": "Lyon", "bytes": [76, 121, 111, 110], "logprob": -2.5},
            ],
        }
    ]
    [scored] = scored_tokens(probs, 1)
    assert (scored.token, scored.logprob) == (b"Par", -0.1)
    assert [(c.token, c.logprob) for c in scored.top] == [(b"Par", -0.1)]
    assert scored_tokens(probs, 0)[0].top == ()


def test_a_prompt_too_long_for_the_context_becomes_context_length_exceeded() -> None:
    content = json.dumps(
        {
            "error": {
                "code": 400,
                "message": "request (300 tokens) exceeds the available context size (128 tokens)",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 300,
                "n_ctx": 128,
            }
        }
    ).encode()
    error = refusal(400, content)
    assert isinstance(error, PromptTooLong)
    assert (error.prompt_tokens, error.context_size) == (300, 128)
    assert error.code == "context_length_exceeded"
    # With a JSON schema (response_format or tools) it is still the prompt's length at fault.
    with_schema = schema_refusal(SamplingParams(json_schema={"type": "object"}), error)
    assert isinstance(with_schema, PromptTooLong)


def test_other_refusals_keep_their_message_and_server_faults_are_engine_errors() -> None:
    bad = refusal(400, b'{"error": {"message": "bad grammar", "type": "invalid_request_error"}}')
    assert isinstance(bad, PromptError)
    assert bad.message == "bad grammar"
    as_schema = schema_refusal(SamplingParams(json_schema={"type": "nonsense"}), bad)
    assert isinstance(as_schema, PromptError)
    assert (as_schema.code, as_schema.param) == ("invalid_schema", "response_format")
    broken = refusal(500, b"not json")
    assert isinstance(broken, EngineError)
    assert "HTTP 500" in str(broken)


def test_each_slot_gets_its_context_and_shared_cores_wait_passively() -> None:
    config = ServerConfig(Path("/m/x.gguf"), ctx_size=1024, slots=4, threads=2, passive_wait=True)
    args = config.args(Path("/run/s.sock"))
    flags = {arg: args[i + 1] for i, arg in enumerate(args[:-1]) if arg.startswith("--")}
    assert (flags["--parallel"], flags["--kv-unified-per-slot"]) == ("4", "1024")
    assert flags["--threads"] == "2"
    assert flags["--poll"] == "0"
    env = config.env("k3y")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["LLAMA_API_KEY"] == "k3y"
    assert "k3y" not in args  # secrets never in argv
    spinning = ServerConfig(Path("/m/x.gguf"), ctx_size=1024, slots=1, threads=2)
    assert "--poll" not in spinning.args(Path("/run/s.sock"))
    embedding = ServerConfig(Path("/m/e.gguf"), 512, 1, 2, embedding=True, pooled=False)
    assert {"--embedding", "--pooling"} <= set(embedding.args(Path("/run/s.sock")))


def test_a_quantized_kv_cache_keeps_every_slot_whole_and_needs_flash_attention() -> None:
    config = ServerConfig(
        Path("/m/x.gguf"), ctx_size=2048, slots=4, threads=2, kv_cache_type="q8_0"
    )
    args = config.args(Path("/run/s.sock"))
    flags = {arg: args[i + 1] for i, arg in enumerate(args[:-1]) if arg.startswith("--")}
    assert (flags["--cache-type-k"], flags["--cache-type-v"]) == ("q8_0", "q8_0")
    assert flags["--flash-attn"] == "on"
    assert flags["--kv-unified-per-slot"] == "2048"  # each slot its whole context, no shared pool
    assert "--no-kv-unified" in args  # ...in a stretch of its own, attending to nothing else
    assert "--ctx-size" not in flags
    plain = ServerConfig(Path("/m/x.gguf"), ctx_size=2048, slots=1, threads=2)
    assert "--cache-type-k" not in plain.args(Path("/run/s.sock"))


def test_a_model_whose_heads_are_not_whole_q8_0_blocks_keeps_an_f16_cache(tmp_path: Path) -> None:
    tiny = read_model_facts(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert tiny.head_sizes == (16, 16)  # llama.cpp refuses a q8_0 cache for 16-value heads
    assert not tiny.quantizable_kv
    smollm = read_model_facts(resolve_model("smollm2-135m-instruct"))
    assert smollm.head_sizes == (64, 64)
    assert smollm.quantizable_kv


def test_a_model_file_replaced_under_the_same_name_is_read_again(tmp_path: Path) -> None:
    """The facts of a file are kept (a standby reads them once for all its forks), but only as
    long as the file stays the one read."""
    path = tmp_path / "m.gguf"
    shutil.copy(resolve_model("smollm2-135m-instruct"), path)
    assert read_model_facts(path).head_sizes == (64, 64)
    write_tiny_gguf(path)
    assert read_model_facts(path).head_sizes == (16, 16)
    path.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="GGUF"):
        read_model_facts(path)


def test_llama_servers_prompt_cache_is_the_workers_never_its_8_gib_default(tmp_path: Path) -> None:
    """llama-server keeps up to 8 GiB of served prompts in RAM unless told otherwise: the worker
    always tells it, 0 (none) unless the queen sized one; an embedding worker keeps none."""

    def cache_ram(**fields: object) -> str:
        model = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
        settings = WorkerSettings(model=model, port=1, queen_url="http://q", **fields)
        args = llama_server(settings).config.args(Path("/run/s.sock"))
        return args[args.index("--cache-ram") + 1]

    assert cache_ram() == "0"
    assert cache_ram(prompt_cache="96MiB") == "96"
    assert cache_ram(prompt_cache=str(96 << 20)) == "96"  # as the hive passes it: bytes
    assert cache_ram(prompt_cache="96MiB", embedding=True) == "0"
    with pytest.raises(ValueError, match="unknown unit"):
        cache_ram(prompt_cache="96MB")


def test_auto_quantizes_the_kv_cache_only_when_several_slots_share_the_memory() -> None:
    def kv(**fields: object) -> str:
        return kv_cache_type(WorkerSettings(model="m.gguf", port=1, queen_url="http://q", **fields))

    assert kv(slots=1) == "f16"
    assert kv(slots=4) == "q8_0"
    assert kv(slots=1, kv_cache_type="q8_0") == "q8_0"
    assert kv(slots=4, kv_cache_type="f16") == "f16"


async def _lines(*events: dict[str, object] | bytes) -> AsyncIterator[bytes]:
    """llama-server's stream as aiohttp hands it on: line by line, blank lines between."""
    for event in events:
        yield event if isinstance(event, bytes) else b"data: " + json.dumps(event).encode() + b"\n"
        yield b"\n"


async def test_a_stream_is_handed_on_piece_by_piece_and_counted_at_its_end() -> None:
    pieces: list[str] = []
    stream = _lines(
        {"content": "Par", "stop": False},
        b": ping",
        {"content": "is", "stop": False},
        {"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 3,
         "tokens_evaluated": 12, "timings": {"cache_n": 8, "prompt_n": 4}},
        {"content": "after the end", "stop": False},
    )  # fmt: skip
    outcome = await read_stream(
        stream, SamplingParams(), lambda t, s=(): pieces.append(t), asyncio.Event()
    )
    assert pieces == ["Par", "is"]
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (12, 3)
    # 8 of the 12 prompt tokens came from llama.cpp's cache: usage says so.
    assert outcome.cached_tokens == 8
    assert (outcome.finish_reason, outcome.cancelled) == ("stop", False)
    limit = _lines({"content": "a", "stop": True, "stop_type": "limit", "tokens_predicted": 1})
    assert (
        await read_stream(limit, SamplingParams(), lambda t, s=(): None, asyncio.Event())
    ).finish_reason == "length"


async def test_a_failure_mid_stream_is_an_engine_error_and_a_cancel_stops_reading() -> None:
    failing = _lines({"content": "a", "stop": False}, {"error": {"code": 500, "message": "boom"}})
    with pytest.raises(EngineError, match="boom"):
        await read_stream(failing, SamplingParams(), lambda t, s=(): None, asyncio.Event())
    cancelled = asyncio.Event()
    cancelled.set()
    endless = _lines(*[{"content": "x", "stop": False}] * 5)
    outcome = await read_stream(endless, SamplingParams(), lambda t, s=(): None, cancelled)
    assert outcome.cancelled
    assert outcome.completion_tokens == 0
