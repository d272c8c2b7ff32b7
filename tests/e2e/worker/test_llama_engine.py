"""The worker's engine against real llama-server processes: requests back to back, and the
chat template rendered in the worker (the same prompt llama.cpp makes, or llama.cpp's own).

SmolLM2's own template, and a tiny model whose template has no system role, which llama.cpp
adapts and the worker must leave to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from rbee.worker.app import resolve_model
from rbee.worker.engines.base import Message, SamplingParams
from rbee.worker.engines.llama_process import LlamaServer, ServerConfig, default_binary
from rbee.worker.engines.llama_server import GENERATION_TIMEOUT, LlamaServerEngine
from rbee_testing.gguf import write_tiny_gguf

from .conftest import SMOLLM

pytestmark = pytest.mark.e2e

# Not one of the probes the template was checked with.
CONVERSATION = [
    Message("system", "Reply with a city."),
    Message("user", "Capital of Italy?"),
    Message("assistant", "Rome."),
    Message("user", "And of Spain?\n\tTabs, 'quotes' & {{ braces }}"),
]
# Mistral-like: system messages have no place of their own.
NO_SYSTEM_ROLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

Started = Callable[[Path], AbstractAsyncContextManager[LlamaServer]]


@pytest.fixture
def llama_server() -> Started:
    @asynccontextmanager
    async def start(model: Path) -> AsyncIterator[LlamaServer]:
        config = ServerConfig(model, ctx_size=512, slots=1, threads=2, binary=default_binary())
        server = LlamaServer(config)
        try:
            await server.start()
            yield server
        finally:
            await server.close()

    return start


async def _llama_cpp_prompt(server: LlamaServer, messages: list[Message]) -> str:
    body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
    async with (
        server.client(GENERATION_TIMEOUT) as http,
        http.post("/apply-template", json=body) as response,
    ):
        prompt: str = (await response.json())["prompt"]
        return prompt


async def test_requests_back_to_back_on_one_engine_all_get_their_answer(
    llama_server: Started,
) -> None:
    # llama-server closes a connection after a streamed answer; while the engine kept its
    # connection for the next request, every other request failed ("Server disconnected").
    async with llama_server(resolve_model(SMOLLM)) as server:
        engine = LlamaServerEngine(server)
        pieces: list[str] = []
        try:
            for _ in range(20):
                prompt = await engine.prepare_chat([Message("user", "Hi")])
                params = SamplingParams(max_tokens=2, temperature=0)
                outcome = await engine.generate(
                    prompt, params, lambda t, s=(): pieces.append(t), asyncio.Event(), lambda: None
                )
                assert outcome.completion_tokens == 2
        finally:
            await engine.close()
    assert len(pieces) >= 20


async def test_smollm2s_template_is_rendered_by_the_worker_exactly_as_llama_cpp_does(
    llama_server: Started,
) -> None:
    async with llama_server(resolve_model(SMOLLM)) as server:
        template = await server.template_learned()
        assert template is not None
        expected = await _llama_cpp_prompt(server, CONVERSATION)
        assert template.render(CONVERSATION) == expected
        engine = LlamaServerEngine(server)
        try:
            assert (await engine.prepare_chat(CONVERSATION)).text == expected
        finally:
            await engine.close()


async def test_a_template_llama_cpp_adapts_stays_with_llama_cpp(
    llama_server: Started, tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "mistral-like.gguf", chat_template=NO_SYSTEM_ROLE)
    async with llama_server(model) as server:
        assert await server.template_learned() is None
        engine = LlamaServerEngine(server)
        try:
            prompt = (await engine.prepare_chat(CONVERSATION)).text
        finally:
            await engine.close()
    # llama.cpp keeps the system message (in the first user turn); rendered plainly it is lost.
    assert "Reply with a city." in prompt
    assert "[INST]" in prompt
