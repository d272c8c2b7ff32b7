"""A GGUF file's header read with `struct`: its metadata, and the bytes of its tensors.

`gguf.GGUFReader` builds a numpy view for every string of the vocabulary: 5–9 s for SmolLM2's
49k tokens on two busy cores. The hive (placement) and the worker (what kind of model it runs)
need a handful of numbers, so the header is walked here, skipping the payloads of long arrays,
with the `gguf` package's own type tables (a few ms).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import gguf

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
KEPT_ARRAY = 1024  # arrays up to this long are kept (per-layer hyperparameters), never a vocabulary


class GgufHeaderError(ValueError):
    pass


class GgufHeader:
    """Scalar metadata, short numeric arrays, every array's length and (with `tensors`) the
    tensors' total bytes of a little-endian GGUF v2/v3 file."""

    def __init__(self, f: BinaryIO, *, tensors: bool = True) -> None:
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
                fmt = _SCALARS.get(item_type)
                if fmt is not None and length > KEPT_ARRAY:
                    f.seek(struct.calcsize(fmt) * length, 1)
                    continue
                items = [self._value(item_type) for _ in range(length)]
                if item_type != gguf.GGUFValueType.STRING and length <= KEPT_ARRAY:
                    self.values[key] = items
            else:
                self.values[key] = self._value(value_type)
        self.tensor_bytes = 0
        for _ in range(n_tensors if tensors else 0):
            self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            tensor_type = self._unpack("<I")
            self._unpack("<Q")  # offset in the data section
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
            elements = 1
            for dim in dims:
                elements *= dim
            self.tensor_bytes += elements // block * size

    @classmethod
    def read(cls, path: Path, *, tensors: bool = True) -> GgufHeader:
        """The header of the file at `path`: GgufHeaderError if it has none, OSError if unreadable."""
        with path.open("rb") as f:
            try:
                return cls(f, tensors=tensors)
            except (struct.error, KeyError) as exc:
                raise GgufHeaderError(f"unreadable header: {exc}") from None

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
