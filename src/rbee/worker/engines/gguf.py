"""What a GGUF file says about itself, read before llama.cpp loads it: a clear message for a
wrong file, and the facts that decide how the worker runs it (generating, or embeddings)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rbee.common.model_memory import Q8_0_BLOCK
from rbee.worker.engines.base import EngineError

GGUF_MAGIC = b"GGUF"

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

# GGUF value types: fixed sizes as struct formats; 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_FACT_KEYS = (
    ".pooling_type",
    ".embedding_length",
    ".attention.head_count",
    ".attention.key_length",
    ".attention.value_length",
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
    def quantizable_kv(self) -> bool:
        """A q8_0 KV cache stores blocks of 32 values, so each head must be whole blocks."""
        return all(size > 0 and size % Q8_0_BLOCK == 0 for size in self.head_sizes)


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    value: int | float | bool = struct.unpack("<" + fmt, data)[0]
    return value


def _string(f: BinaryIO) -> str:
    length = int(_read(f, "Q"))
    data = f.read(length)
    if len(data) != length:
        raise EOFError
    return data.decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> object:
    """The next value; arrays are skipped (as fast as their type allows) and read as None."""
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = int(_read(f, "I")), int(_read(f, "Q"))
        if item in _SCALARS:
            f.seek(struct.calcsize("<" + _SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, wanted: Callable[[str], bool]) -> dict[str, object]:
    """The wanted keys of the file's metadata (the header only; tensors are never read)."""
    found: dict[str, object] = {}
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("bad magic")
        _read(f, "I")  # version
        _read(f, "Q")  # tensor count
        for _ in range(int(_read(f, "Q"))):
            key = _string(f)
            value = _value(f, int(_read(f, "I")))
            if wanted(key):
                found[key] = value
    return found


def read_model_facts(path: Path) -> ModelFacts:
    check_gguf(path)
    try:
        meta = read_metadata(
            path, lambda key: key == "general.architecture" or key.endswith(_FACT_KEYS)
        )
        architecture = str(meta.get("general.architecture", ""))
        pooling = meta.get(f"{architecture}.pooling_type")
        width, heads = (meta.get(architecture + k) for k in _FACT_KEYS[1:3])
        head = width // heads if isinstance(width, int) and isinstance(heads, int) and heads else 0
        key_size = meta.get(f"{architecture}.attention.key_length", head)
        value_size = meta.get(f"{architecture}.attention.value_length", head)
    except (OSError, EOFError, ValueError, struct.error, MemoryError):
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
