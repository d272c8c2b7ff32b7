"""A GGUF file's header read with `struct`: its metadata, and the bytes of its tensors.

`gguf.GGUFReader` builds a numpy view for every string of the vocabulary: 5–9 s for SmolLM2's
49k tokens on two busy cores. The hive (placement) and the worker (what kind of model it runs)
need a handful of numbers, so the header is walked here, skipping the payloads of long arrays,
in a few ms (SmolLM2) to a few tens of ms (Gemma 3's 262k tokens). The value types are the
GGUF spec's numbers, written out here: importing the
`gguf` package (and numpy with it) took a quarter of a second of every worker's start, before
its llama-server could begin to load. The package's table of tensor types is imported only
where tensor sizes are read (the hive's placement).
"""

from __future__ import annotations

import mmap
import struct
from enum import IntEnum
from pathlib import Path
from typing import Any

Buffer = bytes | mmap.mmap


class ValueType(IntEnum):
    """GGUF's metadata value types, by the numbers of the file format."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALARS: dict[int, struct.Struct] = {
    value_type: struct.Struct(fmt)
    for value_type, fmt in (
        (ValueType.UINT8, "<B"),
        (ValueType.INT8, "<b"),
        (ValueType.UINT16, "<H"),
        (ValueType.INT16, "<h"),
        (ValueType.UINT32, "<I"),
        (ValueType.INT32, "<i"),
        (ValueType.FLOAT32, "<f"),
        (ValueType.BOOL, "<?"),
        (ValueType.UINT64, "<Q"),
        (ValueType.INT64, "<q"),
        (ValueType.FLOAT64, "<d"),
    )
}
_U32, _U64 = _SCALARS[ValueType.UINT32], _SCALARS[ValueType.UINT64]
MAX_ITEMS = 1 << 26  # more array items or tensors than any real model: a corrupt header
KEPT_ARRAY = 1024  # arrays up to this long are kept (per-layer hyperparameters), never a vocabulary


class GgufHeaderError(ValueError):
    pass


class GgufHeader:
    """Scalar metadata, short numeric arrays, every array's length and (with `tensors`) the
    tensors' total bytes of a little-endian GGUF v2/v3 file."""

    def __init__(self, data: Buffer, *, tensors: bool = True) -> None:
        # Parsed by offsets into the file's bytes (mapped, not read): the strings of a vocabulary
        # are skipped at one `unpack_from` each. Reading them through a file object, two calls
        # each, took a quarter of a second of every Gemma 3 worker's start (262k tokens).
        self._data = data
        self._at = 4
        if bytes(data[:4]) != b"GGUF":
            raise GgufHeaderError("not a GGUF file")
        version = self._unpack(_U32)
        if version not in (2, 3):
            raise GgufHeaderError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._count(), self._count()
        self.values: dict[str, Any] = {}
        self.lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            value_type = self._unpack(_U32)
            if value_type == ValueType.ARRAY:
                item_type, length = self._unpack(_U32), self._count()
                self.lengths[key] = length
                if item_type == ValueType.STRING:
                    self._skip_strings(length)
                    continue
                fmt = _SCALARS.get(item_type)
                if fmt is not None and length > KEPT_ARRAY:
                    self._skip(fmt.size * length)
                    continue
                items = [self._value(item_type) for _ in range(length)]
                if length <= KEPT_ARRAY:
                    self.values[key] = items
            else:
                self.values[key] = self._value(value_type)
        self.tensor_bytes = 0
        if tensors and n_tensors:
            self.tensor_bytes = self._tensor_bytes(n_tensors)

    def _tensor_bytes(self, n_tensors: int) -> int:
        import gguf  # its table of tensor types; numpy comes with it (see the module's text)

        total = 0
        for _ in range(n_tensors):
            self._string()
            dims = [self._unpack(_U64) for _ in range(self._unpack(_U32))]
            tensor_type = self._unpack(_U32)
            self._unpack(_U64)  # offset in the data section
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
            elements = 1
            for dim in dims:
                elements *= dim
            total += elements // block * size
        return total

    @classmethod
    def read(cls, path: Path, *, tensors: bool = True) -> GgufHeader:
        """The header of the file at `path`: GgufHeaderError if it has none, OSError if unreadable."""
        with path.open("rb") as f:
            if len(f.read(4)) < 4:  # an empty file cannot be mapped
                raise GgufHeaderError("not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                try:
                    return cls(data, tensors=tensors)
                except (struct.error, KeyError, ValueError) as exc:
                    if isinstance(exc, GgufHeaderError):
                        raise
                    raise GgufHeaderError(f"unreadable header: {exc}") from None

    def _skip(self, size: int) -> None:
        if self._at + size > len(self._data):
            raise GgufHeaderError("the header is cut short")
        self._at += size

    def _skip_strings(self, count: int) -> None:
        at, end, unpack = self._at, len(self._data), _U64.unpack_from
        for _ in range(count):
            at += 8 + unpack(self._data, at)[0]
            if at > end:
                raise GgufHeaderError("the header is cut short")
        self._at = at

    def _unpack(self, fmt: struct.Struct) -> Any:
        value = fmt.unpack_from(self._data, self._at)[0]
        self._at += fmt.size
        return value

    def _count(self) -> int:
        count: int = self._unpack(_U64)
        if count > MAX_ITEMS:
            raise GgufHeaderError(f"implausible count {count}")
        return count

    def _string(self) -> str:
        length = self._count()
        start = self._at
        self._skip(length)
        return bytes(self._data[start : start + length]).decode("utf-8", "replace")

    def _value(self, value_type: int) -> Any:
        if value_type == ValueType.STRING:
            return self._string()
        fmt = _SCALARS.get(value_type)
        if fmt is None:
            raise GgufHeaderError(f"unknown value type {value_type}")
        return self._unpack(fmt)
