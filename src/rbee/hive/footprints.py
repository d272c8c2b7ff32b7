"""The memory footprint of each catalog model, read from its GGUF header for the queen's placement.

The header is walked with `common.gguf_header` (a few ms, where `gguf.GGUFReader` takes
seconds). Results are kept per (path, size, mtime), so a heartbeat reads only new files.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import gguf

from rbee.common.gguf_header import GgufHeader, GgufHeaderError
from rbee.common.model_memory import F16, Q8_0_BLOCK
from rbee.contracts.hive_api import CatalogModel
from rbee.contracts.hives import ModelFootprint

log = logging.getLogger("rbee.hive.footprints")


def read_footprint(path: Path) -> ModelFootprint:
    """The footprint of one GGUF file; GgufHeaderError (or OSError) for a file that has none."""
    header = GgufHeader.read(path)
    values = header.values
    arch = values.get("general.architecture")

    def hparam(name: str, default: Any = None) -> Any:
        return values.get(f"{arch}.{name}", default)

    layers, embd, heads = (
        hparam("block_count"),
        hparam("embedding_length"),
        hparam("attention.head_count"),
    )
    if not isinstance(arch, str) or not layers or not embd:
        raise GgufHeaderError("no architecture, block count or embedding length")
    heads = heads if heads else 1
    # Grouped-query attention: K and V have head_count_kv heads, given once or per layer.
    per_layer_heads = _per_layer(hparam("attention.head_count_kv", heads), layers)
    per_layer_q = _per_layer(heads, layers)
    kv_elements, head_sizes = 0, set()
    for kv_heads, q_heads in zip(per_layer_heads, per_layer_q, strict=True):
        head_dim = embd // q_heads if q_heads else 0
        key = hparam("attention.key_length", head_dim)
        value = hparam("attention.value_length", head_dim)
        kv_elements += kv_heads * (key + value)
        head_sizes |= {key, value}
    vocab = hparam("vocab_size") or header.lengths.get("tokenizer.ggml.tokens", 0)
    trained = hparam("context_length")
    feed_forward = max(_per_layer(hparam("feed_forward_length", 0), layers))
    return ModelFootprint(
        weights_bytes=header.tensor_bytes,
        layers=layers,
        kv_bytes_per_token=kv_elements * F16,
        vocab_size=vocab,
        head_count=max(per_layer_q),
        kv_quantizable=all(size > 0 and size % Q8_0_BLOCK == 0 for size in head_sizes),
        context_length=int(trained) if isinstance(trained, int) and trained > 0 else None,
        quantization=quantization(values.get("general.file_type")),
        embedding_length=int(embd),
        feed_forward_length=feed_forward,
    )


def quantization(file_type: Any) -> str | None:
    """`Q4_K_M` for GGUF's general.file_type 15 (gguf's LlamaFileType, less its MOSTLY_)."""
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def _per_layer(value: Any, layers: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:layers]] or [0]
    return [int(value)] * layers


class FootprintCache:
    """Footprints of catalog models; a file is read again only when its size or mtime changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int], ModelFootprint | None] = {}

    def footprints(self, models: list[CatalogModel]) -> dict[str, ModelFootprint]:
        found: dict[str, ModelFootprint] = {}
        keep: dict[tuple[str, int, int], ModelFootprint | None] = {}
        for model in models:
            try:
                stat = Path(model.path).stat()
            except OSError:
                continue
            key = (model.path, stat.st_size, stat.st_mtime_ns)
            with self._lock:
                cached = self._known.get(key, ...)
            footprint = self._read(model) if cached is ... else cached
            keep[key] = footprint
            if footprint is not None:
                found[model.id] = footprint
        with self._lock:
            self._known = keep
        return found

    @staticmethod
    def _read(model: CatalogModel) -> ModelFootprint | None:
        try:
            return read_footprint(Path(model.path))
        except (GgufHeaderError, OSError, ValueError) as exc:
            # Such a file cannot be loaded either; the queen places it without an estimate.
            log.info("no memory estimate for %s: %s", model.id, exc)
            return None
