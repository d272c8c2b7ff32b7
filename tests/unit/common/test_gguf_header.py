"""The GGUF header reader: its value types are the file format's, and a worker reads the facts
of its model without importing numpy (a quarter of a second of every start)."""

from __future__ import annotations

import subprocess
import sys

import gguf

from rbee.common.gguf_header import ValueType


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
