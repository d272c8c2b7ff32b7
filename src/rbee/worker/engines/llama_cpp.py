"""The real engine: one llama.cpp model and context, through llama-cpp-python.

A `Llama` object is not thread-safe, so each engine is used by one generation at a time (the
slot pool guarantees it) and `--slots N` loads N of them. The weights are memory-mapped from
the same file, so the extra cost of a slot is mostly its own KV cache (`--ctx-size` tokens).
"""

from __future__ import annotations

import ctypes
import logging
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rbee.worker.engines.base import (
    EngineError,
    Message,
    Outcome,
    Prompt,
    PromptError,
    PromptTooLong,
    SamplingParams,
)
from rbee.worker.engines.text import StopMatcher, Utf8Stream

log = logging.getLogger("rbee.worker.llama_cpp")
_llama_log = logging.getLogger("llama.cpp")

GGUF_MAGIC = b"GGUF"

# Used only for a model file that carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_log_callback: Any = None


def _route_llama_logs() -> None:
    """Send llama.cpp's own chatter to Python logging (debug) instead of the terminal."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _: ctypes.c_void_p) -> None:
        _llama_log.debug("%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = forward  # keep a reference: ctypes does not
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def check_gguf(path: Path) -> None:
    """Cheap checks that give a clear message before llama.cpp is asked to load the file."""
    if not path.exists():
        raise EngineError(f"model file {path} does not exist")
    if not path.is_file():
        raise EngineError(f"model file {path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise EngineError(f"model file {path} cannot be read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise EngineError(f"model file {path} is not a GGUF file (bad magic bytes)")


class LlamaCppEngine:
    def __init__(self, path: Path, *, ctx_size: int, threads: int) -> None:
        check_gguf(path)
        _route_llama_logs()
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=ctx_size,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            log.debug("llama.cpp refused %s: %s", path, exc)
            raise EngineError(
                f"model file {path} cannot be loaded: corrupt or not a supported GGUF model"
            ) from None
        self.path = path
        # llama.cpp may round its context up (to 256), but llama-cpp-python's token buffer
        # has exactly the size asked for: the smaller one is the real limit.
        self._n_ctx = min(self._llm.n_ctx(), ctx_size)
        model = self._llm._model
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=self._llm.metadata.get("tokenizer.chat_template", CHATML_TEMPLATE),
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        self._vocab = model.vocab

    @property
    def context_size(self) -> int:
        return self._n_ctx

    def _fit(self, tokens: list[int], stop: tuple[str, ...] = ()) -> Prompt:
        if not tokens:
            raise PromptError("the prompt is empty", code="empty_prompt")
        # At least one token must fit after the prompt, or nothing can be generated.
        if len(tokens) >= self._n_ctx:
            raise PromptTooLong(len(tokens), self._n_ctx)
        return Prompt(tokens=tokens, stop=stop)

    def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        try:
            formatted = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in messages]  # type: ignore[misc]
            )
        except Exception as exc:  # the template is the model's own code: any failure is the input's
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from None
        tokens = self._llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        stops = tuple(s for s in (formatted.stop or []) if isinstance(s, str) and s)
        return self._fit(tokens, stops)

    def prepare_text(self, text: str) -> Prompt:
        return self._fit(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Outcome:
        import llama_cpp

        llm = self._llm
        room = self._n_ctx - len(prompt.tokens)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        stops = StopMatcher((*params.stop, *prompt.stop))
        utf8 = Utf8Stream()
        produced, finish, was_cancelled = 0, "length", False
        tokens = llm.generate(
            list(prompt.tokens),
            temp=params.temperature,
            top_p=params.top_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        try:
            while produced < limit:
                if cancelled.is_set():
                    was_cancelled = True
                    break
                token = next(tokens)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                produced += 1
                text = stops.push(utf8.push(llm.detokenize([token])))
                if text:
                    emit(text)
                if stops.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        if tail := stops.push(utf8.flush()) + stops.flush():
            emit(tail)
        return Outcome(
            prompt_tokens=len(prompt.tokens),
            completion_tokens=produced,
            finish_reason="stop" if finish == "stop" else "length",
            cancelled=was_cancelled,
        )

    def close(self) -> None:
        self._llm.close()


def load_llama_engine(path: Path, *, ctx_size: int, threads: int) -> LlamaCppEngine:
    return LlamaCppEngine(path, ctx_size=ctx_size, threads=threads)
