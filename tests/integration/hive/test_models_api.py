"""The catalog, downloads as jobs against a stand-in Hub, devices, the token and the heartbeat."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from rbee.clients.hive import HiveError
from rbee.contracts.jobs import JobEvent
from rbee_testing.gguf import gguf_bytes

from .conftest import HIVE_ID, Hive, HiveFactory, publish

MODEL = "acme/Small-GGUF:small.Q8_0.gguf"


async def events_of(hive: Hive, job_id: str) -> list[JobEvent]:
    return [event async for event in hive.client.job_events(job_id)]


def leftovers(models_dir: Path) -> list[str]:
    partial = models_dir / ".partial"
    return (
        sorted(str(p.relative_to(partial)) for p in partial.rglob("*")) if partial.exists() else []
    )


async def test_catalog_lists_bundled_and_local_files_by_id(hive: Hive, models_dir: Path) -> None:
    models = {m.id: m for m in await hive.client.models()}

    assert models["smollm2-135m-instruct"].source == "bundled"
    tiny = models["acme/tiny-GGUF:tiny.Q4_0.gguf"]
    assert (tiny.source, tiny.format, tiny.size_bytes) == ("huggingface", "gguf", 1004)
    assert Path(tiny.path) == (models_dir / "acme/tiny-GGUF/tiny.Q4_0.gguf").resolve()
    assert models["broken.gguf"].source == "local"
    assert "notes.txt" not in models


async def test_download_reports_progress_and_lands_in_the_catalog(
    hive: Hive, hub_root: Path, models_dir: Path
) -> None:
    data = gguf_bytes(9 * 1024 * 1024 + 17)  # over two of the writes in a thread, and a rest
    publish(hub_root, "acme/Small-GGUF", "small.Q8_0.gguf", data)

    created = await hive.client.start_download(MODEL)
    assert created.sse_url == f"/v1/jobs/{created.job_id}/stream"
    events = await events_of(hive, created.job_id)

    progress = [e for e in events if e.type == "progress"]
    assert progress
    assert all(e.bytes_total == len(data) for e in progress)
    assert [e.bytes_done for e in progress] == sorted(e.bytes_done or 0 for e in progress)
    assert progress[-1].bytes_done == len(data)
    assert events[-1].type == "done"
    assert events[-1].result is not None
    assert events[-1].result["id"] == MODEL
    stored = models_dir / "acme" / "Small-GGUF" / "small.Q8_0.gguf"
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert MODEL in [m.id for m in await hive.client.models()]
    assert leftovers(models_dir) == []


async def test_the_queen_learns_of_a_new_model_without_waiting_an_interval(
    hive: Hive, hub_root: Path
) -> None:
    publish(hub_root, "acme/Small-GGUF", "small.Q8_0.gguf", gguf_bytes(104))
    await hive.client.download(MODEL)

    async def queen_models() -> list[str]:
        hives = (await hive.queen.get("/v1/hives")).json()["hives"]
        return [m for h in hives if h["id"] == HIVE_ID for m in h["models"]]

    async with asyncio.timeout(10):  # the heartbeat interval here is 60 s
        while True:
            if MODEL in await queen_models():
                break
            await asyncio.sleep(0.05)
    hives = (await hive.queen.get("/v1/hives")).json()["hives"]
    assert hives[0]["url"] == "http://127.0.0.1:" + str(hive.settings.port)
    assert hives[0]["devices"][0]["id"] == "cpu:0"


async def test_cancelled_download_leaves_nothing(
    hive: Hive, hub_root: Path, models_dir: Path
) -> None:
    ref = "acme/Small-GGUF:small.stall.gguf"
    publish(hub_root, "acme/Small-GGUF", "small.stall.gguf", gguf_bytes(1024 * 1024))
    created = await hive.client.start_download(ref)
    async with asyncio.timeout(20):
        while True:  # until bytes have arrived: the stand-in then holds the rest back
            last = (await hive.client.job(created.job_id)).last_event
            if last is not None and (last.bytes_done or 0) > 0:
                break
            await asyncio.sleep(0.02)
    assert leftovers(models_dir) != []

    cancelled = await hive.client.cancel_job(created.job_id)

    assert cancelled.status == "cancelled"
    events = await events_of(hive, created.job_id)
    assert (events[-1].type, events[-1].code) == ("error", "cancelled")
    assert ref not in [m.id for m in await hive.client.models()]
    assert leftovers(models_dir) == []
    assert not (models_dir / "acme" / "Small-GGUF").exists()
    # The file may be asked for again once the first attempt is gone.
    again = await hive.client.start_download(ref)
    await hive.client.cancel_job(again.job_id)


async def test_a_corrupt_download_is_an_error_and_is_discarded(
    hive: Hive, hub_root: Path, models_dir: Path
) -> None:
    publish(hub_root, "acme/Small-GGUF", "small.corrupt.gguf", gguf_bytes(4096))
    with pytest.raises(HiveError, match="SHA-256"):
        await hive.client.download("acme/Small-GGUF:small.corrupt.gguf")
    assert leftovers(models_dir) == []
    assert not (models_dir / "acme" / "Small-GGUF").exists()


async def test_missing_repo_or_file_ends_the_job_with_not_found(hive: Hive, hub_root: Path) -> None:
    publish(hub_root, "acme/Small-GGUF", "other.gguf", b"x")
    with pytest.raises(HiveError, match="has no file") as missing_file:
        await hive.client.download("acme/Small-GGUF:absent.gguf")
    assert missing_file.value.code == "file_not_found"
    with pytest.raises(HiveError, match="no repository") as missing_repo:
        await hive.client.download("nobody/nothing:x.gguf")
    assert missing_repo.value.code == "repo_not_found"


@pytest.mark.parametrize(
    "ref",
    [
        "acme/Small-GGUF",  # no file
        "acme:small.gguf",  # not org/repo
        "acme/Small-GGUF:../../escape.gguf",
        "acme/Small-GGUF:/etc/passwd.gguf",
        "acme/../x:small.gguf",
        "acme/Small-GGUF:small.bin",  # not GGUF
        "-rf/x:y.gguf",
    ],
)
async def test_bad_download_references_are_refused_before_any_job(hive: Hive, ref: str) -> None:
    response = await hive.http.post("/v1/jobs", json={"operation": "model_download", "model": ref})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_a_second_download_of_the_same_file_is_a_conflict(hive: Hive, hub_root: Path) -> None:
    publish(hub_root, "acme/Small-GGUF", "small.stall.gguf", gguf_bytes(1024 * 1024))
    first = await hive.client.start_download("acme/Small-GGUF:small.stall.gguf")
    body = {"operation": "model_download", "model": "acme/Small-GGUF:small.stall.gguf"}
    assert (await hive.http.post("/v1/jobs", json=body)).status_code == 409
    await hive.client.cancel_job(first.job_id)


async def test_other_job_kinds_are_for_the_queen(hive: Hive) -> None:
    response = await hive.http.post("/v1/jobs", json={"operation": "model_list"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_operation"
    assert (await hive.http.get("/v1/jobs/nope/stream")).status_code == 404
    assert (await hive.http.delete("/v1/jobs/nope")).status_code == 404


async def test_delete_removes_a_downloaded_model_but_not_a_bundled_one(
    hive: Hive, models_dir: Path
) -> None:
    deleted = await hive.client.delete_model("acme/tiny-GGUF:tiny.Q4_0.gguf")
    assert deleted.id == "acme/tiny-GGUF:tiny.Q4_0.gguf"
    assert not (models_dir / "acme").exists()
    assert "acme/tiny-GGUF:tiny.Q4_0.gguf" not in [m.id for m in await hive.client.models()]
    assert (await hive.http.delete("/v1/models/acme/tiny-GGUF:tiny.Q4_0.gguf")).status_code == 404
    assert (await hive.http.delete("/v1/models/smollm2-135m-instruct")).status_code == 400
    assert (await hive.http.delete("/v1/models/..%2F..%2Fetc%2Fpasswd")).status_code == 400


async def test_capabilities_report_the_cpu(hive: Hive) -> None:
    caps = await hive.client.capabilities()
    assert caps.hive_id == HIVE_ID
    cpu = caps.devices[0]
    assert (cpu.id, cpu.kind) == ("cpu:0", "cpu")
    assert (cpu.cores or 0) >= 1
    assert 0 < cpu.memory_free_bytes <= cpu.memory_total_bytes


async def test_with_a_token_everything_but_health_needs_it(make_hive: HiveFactory) -> None:
    async with make_hive(token="s3cret") as hive:
        transport = hive.http._transport
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1:9"
        ) as anonymous:
            assert (await anonymous.get("/health")).status_code == 200
            for method, path in [
                ("GET", "/v1/capabilities"),
                ("GET", "/v1/workers"),
                ("POST", "/v1/workers/1/stop"),
                ("POST", "/v1/workers/spawn"),
                ("GET", "/v1/models"),
                ("DELETE", "/v1/models/broken.gguf"),
                ("POST", "/v1/jobs"),
                ("GET", "/v1/jobs/x/stream"),
                ("DELETE", "/v1/jobs/x"),
            ]:
                response = await anonymous.request(method, path)
                assert response.status_code == 401, (method, path)
        assert len(await hive.client.models()) >= 2  # the client sends the token
