"""What a GGUF file says about itself, read before llama.cpp loads it: a clear message for a
wrong file, and the facts that decide how the worker runs it (generating, or embeddings)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from rbee.common.gguf_header import GgufHeader
from rbee.common.model_memory import Q8_0_BLOCK
from rbee.worker.engines.base import EngineError

GGUF_MAGIC = b"GGUF"
POOLING_RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK

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


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF file says about itself that decides how the worker runs it."""

    architecture: str
    # llama.cpp's pooling type named in the file (1 mean, 2 cls, 3 last, 4 rank); None if
    # the file names none, as generative models do.
    pooling: int | None
    # The size of one attention head's key and value vectors (0 when the file does not say
    # plainly, as with a head count per layer).
    head_sizes: tuple[int, int] = (0, 0)

    @property
    def embedding_model(self) -> bool:
        return self.architecture in ENCODER_ARCHITECTURES or bool(self.pooling)

    @property
    def reranker(self) -> bool:
        """The file pools by rank: a reranker, which scores (query, document) pairs."""
        return self.pooling == POOLING_RANK

    @property
    def quantizable_kv(self) -> bool:
        """A q8_0 KV cache stores blocks of 32 values, so each head must be whole blocks."""
        return all(size > 0 and size % Q8_0_BLOCK == 0 for size in self.head_sizes)


def read_model_facts(path: Path) -> ModelFacts:
    """What the worker needs to know of a model file before llama.cpp loads it. Kept for each
    file as long as its size and change time stay: the hive's standby reads a model's once, and
    every worker it forks for that model has them (`rbee.worker.standby`)."""
    try:
        stat = path.stat()
    except OSError:
        return _read_model_facts(path)  # says what is wrong with it
    return _cached_facts(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_facts(path: Path, size: int, changed_ns: int) -> ModelFacts:
    return _read_model_facts(path)


def _read_model_facts(path: Path) -> ModelFacts:
    check_gguf(path)
    try:
        meta = GgufHeader.read(path, tensors=False).values
        architecture = str(meta.get("general.architecture", ""))
        pooling = meta.get(f"{architecture}.pooling_type")
        width = meta.get(f"{architecture}.embedding_length")
        heads = meta.get(f"{architecture}.attention.head_count")
        head = width // heads if isinstance(width, int) and isinstance(heads, int) and heads else 0
        key_size = meta.get(f"{architecture}.attention.key_length", head)
        value_size = meta.get(f"{architecture}.attention.value_length", head)
    except (OSError, ValueError, MemoryError):
        raise EngineError(
            f"model file {path} cannot be loaded: corrupt or not a supported GGUF model"
        ) from None
    return ModelFacts(
        architecture,
        int(pooling) if isinstance(pooling, int) else None,
        (
            key_size if isinstance(key_size, int) else 0,
            value_size if isinstance(value_size, int) else 0,
        ),
    )
