"""The real engine: one llama.cpp model and context, through llama-cpp-python.

A `Llama` object is not thread-safe, so each engine is used by one generation at a time (the
slot pool guarantees it) and `--slots N` loads N of them. The weights are memory-mapped from
the same file, so the extra cost of a slot is mostly its own KV cache (`--ctx-size` tokens).
"""

from __future__ import annotations

import ctypes
import json
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.worker.engines.base import (
    Embeddings,
    Emit,
    EngineError,
    Message,
    Outcome,
    Prompt,
    PromptError,
    PromptTooLong,
    SamplingParams,
    Scored,
)
from rbee.worker.engines.scoring import LogitBias, ScoreKeeper
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


# Architectures that only encode text: they make embeddings and cannot generate.
ENCODER_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "t5encoder",
    }
)


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF file says about itself that decides how the worker runs it."""

    architecture: str
    # llama.cpp's pooling type named in the file (1 mean, 2 cls, 3 last, 4 rank); None if
    # the file names none, as generative models do.
    pooling: int | None

    @property
    def embedding_model(self) -> bool:
        return self.architecture in ENCODER_ARCHITECTURES or bool(self.pooling)


def read_model_facts(path: Path) -> ModelFacts:
    """Reads the file's metadata with llama.cpp (vocabulary only: no weights, ~0.2 s). The
    `gguf` package reads it too, but takes seconds on a 100 MB file as it parses every tensor."""
    check_gguf(path)
    _route_llama_logs()
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError):
        raise EngineError(
            f"model file {path} cannot be loaded: corrupt or not a supported GGUF model"
        ) from None
    try:
        metadata = llm.metadata
    finally:
        llm.close()
    architecture = metadata.get("general.architecture", "")
    pooling = metadata.get(f"{architecture}.pooling_type")
    return ModelFacts(architecture, int(pooling) if pooling and pooling.isdigit() else None)


class LlamaCppEngine:
    def __init__(
        self,
        path: Path,
        *,
        ctx_size: int,
        threads: int,
        embedding: bool = False,
        pooled: bool = True,
    ) -> None:
        """`embedding` loads the model for `embed` only; `pooled` says its file names a pooling
        of its own (embedding models do), else the token vectors are averaged."""
        check_gguf(path)
        _route_llama_logs()
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        extra: dict[str, Any] = {}
        if embedding:
            # One text is decoded in one batch, so a batch holds a whole context.
            extra = {"embedding": True, "n_batch": ctx_size, "n_ubatch": ctx_size}
            if not pooled:
                extra["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=ctx_size,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                **extra,
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

    @property
    def vocab_size(self) -> int:
        return int(self._llm.n_vocab())

    @property
    def embedding_size(self) -> int:
        return int(self._llm.n_embd())

    def _grammar(self, schema: Any) -> Any:
        from llama_cpp.llama_grammar import LlamaGrammar

        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as exc:  # the converter raises plain errors for schemas it cannot read
            raise PromptError(
                f"the JSON schema cannot be turned into a grammar: {exc}",
                code="invalid_schema",
                param="response_format",
            ) from None

    def check(self, params: SamplingParams) -> None:
        vocab = self.vocab_size
        for token in params.logit_bias:
            if not 0 <= token < vocab:
                raise PromptError(
                    f"logit_bias names token {token}, but this model's tokens are 0-{vocab - 1}",
                    code="invalid_logit_bias",
                    param="logit_bias",
                )
        if params.json_schema is not None:
            self._grammar(params.json_schema)

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
        emit: Emit,
        cancelled: threading.Event,
    ) -> Outcome:
        import llama_cpp

        llm = self._llm
        room = self._n_ctx - len(prompt.tokens)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        if params.seed is not None:
            # Reusing a cached prompt prefix decodes the rest in another batch shape, which
            # moves the logits by rounding: enough to change a sampled token. A seeded request
            # decodes its whole prompt afresh, so the same seed gives the same text.
            llm.reset()  # type: ignore[no-untyped-call]
        stops = StopMatcher((*params.stop, *prompt.stop))
        utf8 = Utf8Stream()
        produced, finish, was_cancelled = 0, "length", False
        # Scores are read before any bias: they are the model's own log-probabilities.
        keeper = ScoreKeeper(params.logprobs) if params.logprobs is not None else None
        processors = [p for p in (keeper, LogitBias.of(params.logit_bias)) if p is not None]
        scored: list[Scored] = []
        tokens = llm.generate(
            list(prompt.tokens),
            temp=params.temperature,
            top_p=params.top_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logits_processor=llama_cpp.LogitsProcessorList(processors) if processors else None,
            grammar=None if params.json_schema is None else self._grammar(params.json_schema),
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
                piece = llm.detokenize([token])
                if keeper is not None:
                    scored.append(keeper.score(token, piece, self._token_bytes))
                text = stops.push(utf8.push(piece))
                if text:
                    emit(text, scored)
                    scored = []
                if stops.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        if (tail := stops.push(utf8.flush()) + stops.flush()) or scored:
            emit(tail, scored)
        return Outcome(
            prompt_tokens=len(prompt.tokens),
            completion_tokens=produced,
            finish_reason="stop" if finish == "stop" else "length",
            cancelled=was_cancelled,
        )

    def _token_bytes(self, token: int) -> bytes:
        return bytes(self._llm.detokenize([token]))

    def embed(self, texts: Sequence[str]) -> Embeddings:
        if not self._llm.context_params.embeddings:
            raise PromptError(
                "this worker was not started for embeddings (llm-worker-rbee --embedding)",
                code="not_an_embedding_worker",
                param="model",
            )
        for i, text in enumerate(texts):
            count = len(self._llm.tokenize(text.encode("utf-8"), add_bos=True))
            if not text:
                raise PromptError("the input is empty", code="empty_input", param=f"input[{i}]")
            if count > self._n_ctx:
                raise PromptError(
                    f"This model's maximum context length is {self._n_ctx} tokens, but input "
                    f"{i} is {count} tokens long. Please shorten it.",
                    code="context_length_exceeded",
                    param=f"input[{i}]",
                )
        vectors: list[list[float]] = []
        tokens = 0
        for text in texts:
            # One text per decode: batched with others, the same text comes out different in
            # the last digits (another batch shape, another rounding), and a client comparing
            # vectors expects the same text to give the same vector.
            [vector], count = self._llm.embed(
                [text], normalize=True, truncate=False, return_count=True
            )
            vectors.append([float(x) for x in vector])
            tokens += int(count)
        return Embeddings(vectors=vectors, prompt_tokens=tokens)

    def close(self) -> None:
        self._llm.close()


def load_llama_engine(
    path: Path, *, ctx_size: int, threads: int, embedding: bool = False, pooled: bool = True
) -> LlamaCppEngine:
    return LlamaCppEngine(
        path, ctx_size=ctx_size, threads=threads, embedding=embedding, pooled=pooled
    )
