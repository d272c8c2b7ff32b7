"""Model downloads from the Hugging Face Hub, with progress, cancellation and no partial files.

`huggingface_hub` resolves the file (URL, endpoint from `HF_ENDPOINT`, token, redirects, size,
ETag, and its error types for missing or gated repos); the bytes are then streamed with an
async httpx client, so cancelling the job closes the connection at once instead of waiting for
a blocked read in a thread. Bytes land in `MODELS_DIR/.partial/<job id>/`, hidden from the
catalog, and are moved into place with one atomic rename only when the size (and the SHA-256,
when the Hub's ETag is one) check out. Whatever happens — error, cancel — the partial folder
is removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from collections.abc import Callable
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
from rbee.contracts.hive_api import CatalogModel
from rbee.contracts.jobs import JobEvent
from rbee.hive.catalog import Catalog, HubFile

PROGRESS_EVERY_S = 0.25
# Bytes written and hashed per trip to a thread: hashing gigabytes on the event loop would
# stall the hive's API, and a trip per network chunk would cost more than the hashing.
WRITE_BATCH_BYTES = 4 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Report = Callable[[JobEvent], None]


class DownloadFailed(BadGateway):
    code = "download_failed"


def _write_and_hash(out: BinaryIO, digest: hashlib._Hash, chunks: list[bytes]) -> None:
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


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

    def claim(self, hub: HubFile) -> None:
        """Refuse a second download of a file already on its way; `release` ends the claim."""
        if hub.id in self._active:
            raise Conflict(f"{hub.id} is already being downloaded")
        self._active.add(hub.id)

    def release(self, hub: HubFile) -> None:
        self._active.discard(hub.id)

    async def download(self, hub: HubFile, job_id: str, report: Report) -> CatalogModel:
        """Fetch one file into the catalog."""
        target = self.catalog.path_for(hub)
        if target.is_file():
            report(JobEvent(type="log", message=f"{hub.id} is already in the catalog"))
            return self.catalog.resolve(hub.id)
        partial = self.catalog.partial_dir / job_id
        try:
            await self._fetch(hub, partial / "file", report)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / "file", target)
        finally:
            self._progress.pop(hub.id, None)
            shutil.rmtree(partial, ignore_errors=True)
        return self.catalog.resolve(hub.id)

    async def _fetch(self, hub: HubFile, dest: Path, report: Report) -> None:
        url = hf_hub_url(hub.repo_id, hub.filename, endpoint=self._endpoint)
        report(JobEvent(type="log", message=f"resolving {url}"))
        try:
            meta = await asyncio.to_thread(get_hf_file_metadata, url, endpoint=self._endpoint)
        except GatedRepoError as exc:
            raise DownloadFailed(
                f"{hub.repo_id} is gated: accept its terms, set HF_TOKEN ({exc})"
            ) from None
        except RepositoryNotFoundError:
            raise NotFound(
                f"no repository {hub.repo_id} on the Hub", code="repo_not_found"
            ) from None
        except RemoteEntryNotFoundError:
            raise NotFound(
                f"{hub.repo_id} has no file {hub.filename}", code="file_not_found"
            ) from None
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise NotFound(f"{hub.id} is not on the Hub", code="file_not_found") from None
            raise DownloadFailed(f"the Hub refused {hub.id}: {exc}") from None
        except (OfflineModeIsEnabled, OSError) as exc:
            raise DownloadFailed(f"cannot reach the Hub for {hub.id}: {exc}") from None
        total = meta.size
        headers = {"Accept-Encoding": "identity"}
        if _origin(meta.location) == _origin(url):  # credentials never leave the Hub's host
            headers.update(build_hf_headers())
        report(JobEvent(type="progress", bytes_done=0, bytes_total=total, message="starting"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        done = 0
        self._progress[hub.id] = (0, total)
        last: float | None = None  # the first bytes are always reported
        try:
            async with self._http.stream(
                "GET", meta.location, headers=headers, follow_redirects=True
            ) as response:
                if response.status_code != 200:
                    raise DownloadFailed(f"{meta.location} answered {response.status_code}")
                with dest.open("wb") as out:
                    batch: list[bytes] = []
                    batched = 0
                    async for chunk in response.aiter_bytes():
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= WRITE_BATCH_BYTES:
                            await asyncio.to_thread(_write_and_hash, out, digest, batch)
                            batch, batched = [], 0
                        done += len(chunk)
                        self._progress[hub.id] = (done, total)
                        now = self._clock()
                        if last is None or now - last >= PROGRESS_EVERY_S:
                            last = now
                            report(JobEvent(type="progress", bytes_done=done, bytes_total=total))
                    await asyncio.to_thread(_write_and_hash, out, digest, batch)
        except httpx.HTTPError as exc:
            raise DownloadFailed(
                f"download of {hub.id} broke off after {done} bytes: {exc}"
            ) from None
        report(JobEvent(type="progress", bytes_done=done, bytes_total=total))
        if total is not None and done != total:
            raise DownloadFailed(f"{hub.id}: got {done} bytes, the Hub announced {total}")
        etag = (meta.etag or "").lower()
        if _SHA256.match(etag) and digest.hexdigest() != etag:
            raise DownloadFailed(f"{hub.id}: SHA-256 does not match the Hub's; file discarded")
