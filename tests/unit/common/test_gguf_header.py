"""The GGUF header reader: its value types are the file format's, it reads what `gguf`'s own
reader reads, a cut header is a clear error, and a worker reads the facts of its model without
importing numpy (a quarter of a second of every start)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from rbee.common.gguf_header import GgufHeader, GgufHeaderError, ValueType
from rbee_testing.gguf import write_tiny_gguf


def test_the_value_types_are_the_gguf_packages() -> None:
    ours = {t.name: t.value for t in ValueType}
    assert ours == {t.name: t.value for t in gguf.GGUFValueType}


def test_a_worker_starts_without_importing_numpy() -> None:
    probe = (
        "import sys, rbee.worker.main; rbee.worker.main.import_worker(); "
        "print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_the_header_says_what_ggufs_own_reader_says(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024, pooling=1)
    ours = GgufHeader.read(path)
    theirs = gguf.GGUFReader(path)
    assert ours.values["llama.context_length"] == 1024
    assert ours.values["llama.pooling_type"] == 1
    assert ours.values["general.architecture"] == "llama"
    assert ours.lengths["tokenizer.ggml.tokens"] == 259
    assert ours.tensor_bytes == sum(int(t.n_bytes) for t in theirs.tensors)


def test_a_header_cut_anywhere_is_a_clear_error_never_a_crash(tmp_path: Path) -> None:
    whole = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    end = len(whole) - sum(int(t.n_bytes) for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors)
    cut = tmp_path / "cut.gguf"
    # Every 7th byte of the header (through the vocabulary's strings), and the empty file.
    for size in [0, *range(1, end - 64, 7)]:
        cut.write_bytes(whole[:size])
        with pytest.raises(GgufHeaderError):
            GgufHeader.read(cut)
