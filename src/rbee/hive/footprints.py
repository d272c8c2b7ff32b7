"""The memory footprint of each catalog model, read from its GGUF header for the queen's placement.

`gguf.GGUFReader` builds a numpy view for every string of the vocabulary: 5–9 s for SmolLM2's
49k tokens on two busy cores, at every hive start. Placement needs a handful of numbers, so the
header is walked here with `struct`, skipping array payloads, using the `gguf` package's own
type tables (a few ms). Results are kept per (path, size, mtime), so a heartbeat reads only new
files.
"""

from __future__ import annotations

import logging
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import gguf

from rbee.common.model_memory import F16, Q8_0_BLOCK
from rbee.contracts.hive_api import CatalogModel
from rbee.contracts.hives import ModelFootprint

log = logging.getLogger("rbee.hive.footprints")

_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
MAX_ITEMS = 1 << 26  # more array items or tensors than any real model: a corrupt header


class GgufHeaderError(ValueError):
    pass


class _Header:
    """Scalar metadata, array lengths, and tensor byte sizes of a little-endian GGUF v2/v3 file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        if f.read(4) != b"GGUF":
            raise GgufHeaderError("not a GGUF file")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise GgufHeaderError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._count(), self._count()
        self.values: dict[str, Any] = {}
        self.lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            value_type = self._unpack("<I")
            if value_type == gguf.GGUFValueType.ARRAY:
                item_type, length = self._unpack("<I"), self._count()
                self.lengths[key] = length
                items = [self._value(item_type) for _ in range(length)]
                if item_type != gguf.GGUFValueType.STRING and length <= 1024:
                    self.values[key] = items  # per-layer hyperparameters; never the vocabulary
            else:
                self.values[key] = self._value(value_type)
        self.tensor_bytes = 0
        for _ in range(n_tensors):
            self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            tensor_type = self._unpack("<I")
            self._unpack("<Q")  # offset in the data section
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
            elements = 1
            for dim in dims:
                elements *= dim
            self.tensor_bytes += elements // block * size

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self._f.read(size)
        if len(data) != size:
            raise GgufHeaderError("the header is cut short")
        return struct.unpack(fmt, data)[0]

    def _count(self) -> int:
        count: int = self._unpack("<Q")
        if count > MAX_ITEMS:
            raise GgufHeaderError(f"implausible count {count}")
        return count

    def _string(self) -> str:
        length = self._count()
        data = self._f.read(length)
        if len(data) != length:
            raise GgufHeaderError("the header is cut short")
        return data.decode("utf-8", "replace")

    def _value(self, value_type: int) -> Any:
        if value_type == gguf.GGUFValueType.STRING:
            return self._string()
        fmt = _SCALARS.get(value_type)
        if fmt is None:
            raise GgufHeaderError(f"unknown value type {value_type}")
        return self._unpack(fmt)


def read_footprint(path: Path) -> ModelFootprint:
    """The footprint of one GGUF file; GgufHeaderError (or OSError) for a file that has none."""
    with path.open("rb") as f:
        try:
            header = _Header(f)
        except (struct.error, KeyError) as exc:
            raise GgufHeaderError(f"unreadable header: {exc}") from None
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
    return ModelFootprint(
        weights_bytes=header.tensor_bytes,
        layers=layers,
        kv_bytes_per_token=kv_elements * F16,
        vocab_size=vocab,
        head_count=max(per_layer_q),
        kv_quantizable=all(size > 0 and size % Q8_0_BLOCK == 0 for size in head_sizes),
    )


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
