"""Model downloads from the Hugging Face Hub or a plain URL, with progress, resume and checks.

For a Hub file, `huggingface_hub` resolves it (URL, endpoint from `HF_ENDPOINT`, token,
redirects, size, ETag, and its error types for missing or gated repos); a plain
`https://…/file.gguf` is fetched as it is. The bytes are streamed with an async httpx client, so
cancelling the job closes the connection at once instead of waiting for a blocked read in a
thread.

Bytes land in `MODELS_DIR/.partial/<digest of the model id>.part`, hidden from the catalog. A
download that breaks off (the network, a crash) leaves them there, and the next download of the
same file asks for the rest only (an HTTP range); a cancelled one removes them, unless the
caller keeps them (`rbee model download` interrupted with Ctrl-C on this machine). The file is
moved into place with one atomic rename only when the size (and the SHA-256, when the Hub's
ETag is one) check out and its GGUF header reads; bytes that are not a GGUF model are refused
at the first chunk, with what they look like.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazy export

from rbee.common.clock import Clock, monotonic
from rbee.common.errors import BadGateway, Conflict, NotFound
from rbee.common.gguf_header import GgufHeader, GgufHeaderError
from rbee.contracts.hive_api import CatalogModel
from rbee.contracts.jobs import JobEvent
from rbee.hive.catalog import Catalog, HubFile, UrlFile

PROGRESS_EVERY_S = 0.25
# Bytes written and hashed per trip to a thread: hashing gigabytes on the event loop would
# stall the hive's API, and a trip per network chunk would cost more than the hashing.
WRITE_BATCH_BYTES = 4 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
GGUF_MAGIC = b"GGUF"

Report = Callable[[JobEvent], None]
Source = HubFile | UrlFile


class DownloadFailed(BadGateway):
    code = "download_failed"


class NotGguf(DownloadFailed):
    code = "not_gguf"


@dataclass(frozen=True)
class Remote:
    """Where the bytes are: the URL to GET, the size and ETag announced, the headers to send."""

    location: str
    size: int | None
    etag: str
    headers: dict[str, str]


def _write_and_hash(out: BinaryIO, digest: hashlib._Hash, chunks: list[bytes]) -> None:
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)


def _hash_file(path: Path, digest: hashlib._Hash) -> None:
    with path.open("rb") as f:
        while chunk := f.read(WRITE_BATCH_BYTES):
            digest.update(chunk)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def looks_like(head: bytes) -> str:
    """What bytes that are not GGUF seem to be, for the refusal."""
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML page (is the URL the file's download link?)"
    if text.startswith((b"{", b"[")):
        return "JSON (an error or a listing, not a model file)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it points to"
    return f"a file that starts with {head[:8]!r}"


async def unreachable(url: str, exc: BaseException) -> DownloadFailed:
    """The error for a host that cannot be reached, in words: no network when its name does not
    resolve (no DNS, no route), else why the connection failed."""
    host = urlsplit(url).hostname or url
    try:
        await asyncio.to_thread(socket.getaddrinfo, host, None)
    except (socket.gaierror, UnicodeError):
        return DownloadFailed(f"cannot reach the model host: no network ({host} does not resolve)")
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | ConnectionRefusedError) or "refused" in reason:
        reason = "connection refused"
    elif isinstance(exc, httpx.TimeoutException | TimeoutError):
        reason = "timed out"
    return DownloadFailed(f"cannot reach the model host {host}: {reason}")


class Downloader:
    def __init__(
        self,
        catalog: Catalog,
        http: httpx.AsyncClient,
        *,
        endpoint: str | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self.catalog = catalog
        self._http = http
        self._endpoint = endpoint  # None: huggingface_hub's, i.e. HF_ENDPOINT or the Hub
        self._clock = clock
        self._active: set[str] = set()
        self._progress: dict[str, tuple[int, int | None]] = {}  # id -> (bytes done, size)

    def progress(self) -> dict[str, tuple[int, int | None]]:
        """Downloads under way: bytes received so far and the announced size, by model id."""
        return dict(self._progress)

    def claim(self, source: Source) -> None:
        """Refuse a second download of a file already on its way; `release` ends the claim."""
        if source.id in self._active:
            raise Conflict(f"{source.id} is already being downloaded")
        self._active.add(source.id)

    def release(self, source: Source) -> None:
        self._active.discard(source.id)

    def partial_path(self, source: Source) -> Path:
        """Where the bytes of a download in flight (or broken off) wait."""
        digest = hashlib.sha256(source.id.encode()).hexdigest()[:24]
        return self.catalog.partial_dir / f"{digest}.part"

    async def download(
        self, source: Source, job_id: str, report: Report, *, keep_on_cancel: bool = False
    ) -> CatalogModel:
        """Fetch one file into the catalog, resuming the bytes an earlier attempt left."""
        target = self.catalog.path_for(source)
        if target.is_file():
            report(JobEvent(type="log", message=f"{source.id} is already in the catalog"))
            return self.catalog.resolve(source.id)
        partial = self.partial_path(source)
        try:
            await self._fetch(source, partial, report)
            await asyncio.to_thread(_check_gguf, partial, source.id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
        except NotGguf:
            partial.unlink(missing_ok=True)
            raise
        except asyncio.CancelledError:
            if not keep_on_cancel:
                partial.unlink(missing_ok=True)
            raise
        finally:
            self._progress.pop(source.id, None)
        return self.catalog.resolve(source.id)

    async def _remote(self, source: Source, report: Report) -> Remote:
        if isinstance(source, UrlFile):
            return Remote(source.url, None, "", {"Accept-Encoding": "identity"})
        url = hf_hub_url(source.repo_id, source.filename, endpoint=self._endpoint)
        report(JobEvent(type="log", message=f"resolving {url}"))
        try:
            meta = await asyncio.to_thread(get_hf_file_metadata, url, endpoint=self._endpoint)
        except GatedRepoError as exc:
            raise DownloadFailed(
                f"{source.repo_id} is gated: accept its terms, set HF_TOKEN ({exc})"
            ) from None
        except RepositoryNotFoundError:
            raise NotFound(
                f"no repository {source.repo_id} on the Hub", code="repo_not_found"
            ) from None
        except RemoteEntryNotFoundError:
            raise NotFound(
                f"{source.repo_id} has no file {source.filename}", code="file_not_found"
            ) from None
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise NotFound(f"{source.id} is not on the Hub", code="file_not_found") from None
            raise DownloadFailed(f"the Hub refused {source.id}: {exc}") from None
        except OfflineModeIsEnabled as exc:
            raise DownloadFailed(
                f"cannot reach the model host: offline mode is on ({exc})"
            ) from None
        except Exception as exc:  # the connection: OSError, or the HTTP library's own errors
            raise await unreachable(url, exc) from None
        headers = {"Accept-Encoding": "identity"}
        if _origin(meta.location) == _origin(url):  # credentials never leave the Hub's host
            headers.update(build_hf_headers())
        return Remote(meta.location, meta.size, (meta.etag or "").lower(), headers)

    async def _fetch(self, source: Source, dest: Path, report: Report) -> None:
        remote = await self._remote(source, report)
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = await asyncio.to_thread(_size_of, dest)
        if remote.size is not None and have > remote.size:
            have = 0  # not the same file any more
        if not await self._stream(source, remote, dest, have, report) and have:
            # The server cannot give the rest (416: what is here is no part of the file).
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            await self._stream(source, remote, dest, 0, report)

    async def _stream(
        self, source: Source, remote: Remote, dest: Path, have: int, report: Report
    ) -> bool:
        """GET the file (from byte `have` on) into `dest`; False when the range was refused."""
        headers = dict(remote.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        digest = hashlib.sha256()
        done = 0
        total = remote.size
        last: float | None = None  # the first bytes are always reported
        try:
            async with self._http.stream(
                "GET", remote.location, headers=headers, follow_redirects=True
            ) as response:
                status = response.status_code
                if status == 416 and have:
                    return False
                if status == 206 and have:
                    await asyncio.to_thread(_hash_file, dest, digest)
                    done, append = have, True
                    report(JobEvent(type="log", message=f"resuming {source.id} after {have} bytes"))
                elif status == 200:
                    append = False  # from the start (a server that ignores ranges too)
                else:
                    raise DownloadFailed(f"{remote.location} answered {status}")
                if total is None:
                    length = response.headers.get("Content-Length", "")
                    total = done + int(length) if length.isdigit() else None
                report(
                    JobEvent(
                        type="progress", bytes_done=done, bytes_total=total, message="starting"
                    )
                )
                self._progress[source.id] = (done, total)
                with dest.open("ab" if append else "wb") as out:
                    batch: list[bytes] = []
                    batched = 0
                    head = b"" if done == 0 else GGUF_MAGIC
                    chunks = response.aiter_bytes()
                    while True:
                        try:
                            chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                        except httpx.HTTPError:
                            # What came before the break is kept for the resume.
                            if len(head) >= len(GGUF_MAGIC):
                                await asyncio.to_thread(_write_and_hash, out, digest, batch)
                            raise
                        if len(head) < len(GGUF_MAGIC):
                            head += chunk
                            if len(head) >= len(GGUF_MAGIC) and not head.startswith(GGUF_MAGIC):
                                raise NotGguf(
                                    f"{source.id} is not a GGUF model file: it is "
                                    f"{looks_like(head)}; refused"
                                )
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= WRITE_BATCH_BYTES:
                            await asyncio.to_thread(_write_and_hash, out, digest, batch)
                            batch, batched = [], 0
                        done += len(chunk)
                        self._progress[source.id] = (done, total)
                        now = self._clock()
                        if last is None or now - last >= PROGRESS_EVERY_S:
                            last = now
                            report(JobEvent(type="progress", bytes_done=done, bytes_total=total))
                    await asyncio.to_thread(_write_and_hash, out, digest, batch)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise await unreachable(remote.location, exc) from None
        except httpx.HTTPError as exc:
            raise DownloadFailed(
                f"download of {source.id} broke off after {done} bytes "
                f"({exc or type(exc).__name__}); the same download again resumes it"
            ) from None
        report(JobEvent(type="progress", bytes_done=done, bytes_total=total))
        if total is not None and done != total:
            if done > total:
                await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise DownloadFailed(
                f"{source.id}: got {done} bytes of the {total} announced; the same download "
                "again resumes it"
            )
        if _SHA256.match(remote.etag) and digest.hexdigest() != remote.etag:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise DownloadFailed(f"{source.id}: SHA-256 does not match the Hub's; file discarded")
        return True


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _check_gguf(path: Path, model_id: str) -> None:
    """A whole GGUF file: its header reads (what a worker needs to load it)."""
    try:
        GgufHeader.read(path, tensors=True)
    except GgufHeaderError as exc:
        raise NotGguf(f"{model_id} is not a GGUF model file a worker can load: {exc}") from None
