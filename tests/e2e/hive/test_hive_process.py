"""The real `rbee-hive` with a real queen and real SmolLM2 workers, over loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.clients.hive import HiveClient, HiveError
from rbee.common.bundled import DEFAULT_MODEL
from rbee.common.cpus import parse_cpu_set, usable_cpus
from rbee.worker.engines.llama_process import DIR_PREFIX
from rbee_testing.gguf import gguf_bytes

from .conftest import Daemon, HiveStarter, wait_for

pytestmark = pytest.mark.e2e


def queen_worker(queen: Daemon, worker_id: str) -> dict[str, Any] | None:
    workers = httpx.get(f"{queen.url}/v1/workers", timeout=5).json()["workers"]
    return next((w for w in workers if w["id"] == worker_id), None)


def serves(url: str) -> list[str]:
    """The model ids a worker serves, from its OpenAI API (it answers, not just its health)."""
    response = httpx.get(f"{url}/v1/models", timeout=10)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def spawn(hive_url: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{hive_url}/v1/workers/spawn", json={"model": DEFAULT_MODEL, **fields}, timeout=120
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def test_spawned_worker_registers_with_the_queen_and_leaves_when_stopped(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    hive = start_hive()
    spawned = spawn(hive.url)

    seen = wait_for(
        "the worker ready in the queen",
        lambda: (w := queen_worker(queen, spawned["worker_id"])) and w["status"] == "ready" and w,
    )
    assert seen["hive_id"] == hive.hive_id
    assert seen["port"] == spawned["port"]
    assert seen["model_id"] == DEFAULT_MODEL
    listed = httpx.get(f"{hive.url}/v1/workers").json()["workers"]
    assert [(w["pid"], w["worker_id"], w["model"]) for w in listed] == [
        (spawned["pid"], spawned["worker_id"], DEFAULT_MODEL)
    ]
    assert serves(spawned["url"]) == [DEFAULT_MODEL]
    hives = httpx.get(f"{queen.url}/v1/hives").json()["hives"]
    assert DEFAULT_MODEL in next(h for h in hives if h["id"] == hive.hive_id)["models"]

    stopped = httpx.post(f"{hive.url}/v1/workers/{spawned['pid']}/stop", json={}, timeout=30)
    assert stopped.json()["signal"] == "SIGTERM"
    wait_for(
        "the worker to leave the queen", lambda: queen_worker(queen, spawned["worker_id"]) is None
    )
    assert httpx.get(f"{hive.url}/v1/workers").json()["workers"] == []


def affinity(pid: int) -> set[int]:
    return set(psutil.Process(pid).cpu_affinity() or [])


def test_each_worker_runs_on_cores_of_its_own_and_shares_only_when_none_are_free(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    cores = usable_cpus()
    if len(cores) < 2:
        pytest.skip("needs a machine with two cores or more")
    hive = start_hive()
    first = spawn(hive.url, cores=1)
    second = spawn(hive.url, cores=1)
    assert not first["shared_cores"]
    assert not second["shared_cores"]
    sets = [set(parse_cpu_set(s["cpu_set"])) for s in (first, second)]
    assert len(sets[0]) == len(sets[1]) == 1
    assert not sets[0] & sets[1]
    for spawned, cpus in zip((first, second), sets, strict=True):
        # The worker and its engine (llama-server, its child) run on those cores only.
        assert affinity(spawned["pid"]) == cpus
        engines = psutil.Process(spawned["pid"]).children()
        assert engines
        assert all(affinity(e.pid) == cpus for e in engines)
    listed = httpx.get(f"{hive.url}/v1/workers").json()["workers"]
    assert sorted(w["cpu_set"] for w in listed) == sorted(s["cpu_set"] for s in (first, second))
    # Engine included: a worker's memory is more than its Python process's.
    assert all(w["memory_bytes"] > psutil.Process(w["pid"]).memory_info().rss for w in listed)
    if len(cores) == 2:
        # Every core is taken: a third worker shares, and says so.
        third = spawn(hive.url, cores=1)
        assert third["shared_cores"]
    for w in httpx.get(f"{hive.url}/v1/workers").json()["workers"]:
        httpx.post(f"{hive.url}/v1/workers/{w['pid']}/stop", json={}, timeout=30)


def test_a_one_slot_worker_asked_for_q8_0_runs_its_engine_with_a_q8_0_cache(
    start_hive: HiveStarter,
) -> None:
    hive = start_hive()
    # One slot would keep f16 under auto: q8_0 here is the request's doing.
    spawned = spawn(hive.url, kv_cache_type="q8_0", slots=1, cores=1)
    try:
        [engine] = psutil.Process(spawned["pid"]).children()
        argv = engine.cmdline()
        for flag in ("--cache-type-k", "--cache-type-v"):
            assert argv[argv.index(flag) + 1] == "q8_0"
        assert serves(spawned["url"]) == [DEFAULT_MODEL]
    finally:
        httpx.post(f"{hive.url}/v1/workers/{spawned['pid']}/stop", json={}, timeout=30)


def test_killing_the_hive_leaves_workers_serving_and_a_new_hive_finds_them(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    hive = start_hive()
    spawned = spawn(hive.url)

    hive.proc.signal(signal.SIGKILL)
    hive.proc.wait()

    assert httpx.get(f"{spawned['url']}/health").status_code == 200
    assert serves(spawned["url"]) == [DEFAULT_MODEL]
    worker = wait_for("a ready heartbeat", lambda: queen_worker(queen, spawned["worker_id"]))
    assert worker["status"] == "ready"

    again = start_hive(hive_id=hive.hive_id, port=hive.port)
    listed = httpx.get(f"{again.url}/v1/workers").json()["workers"]
    assert [w["pid"] for w in listed] == [spawned["pid"]]
    httpx.post(
        f"{again.url}/v1/workers/{spawned['pid']}/stop", json={}, timeout=30
    ).raise_for_status()
    assert httpx.get(f"{again.url}/v1/workers").json()["workers"] == []


def test_bad_reference_unknown_model_and_foreign_pid_are_refused(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    hive = start_hive()
    with httpx.Client(base_url=hive.url, timeout=30) as client:
        traversal = client.post("/v1/workers/spawn", json={"model": "../../../etc/passwd"})
        assert traversal.status_code == 400
        assert "leaves the models dir" in traversal.json()["error"]["message"]
        assert client.post("/v1/workers/spawn", json={"model": "llama-9000"}).status_code == 404
        download = {"operation": "model_download", "model": "not a repo:x.gguf"}
        assert client.post("/v1/jobs", json=download).status_code == 400
        foreign = client.post(f"/v1/workers/{queen.proc.pid}/stop", json={})
        assert foreign.status_code == 404
        assert client.post("/v1/workers/1/stop", json={}).status_code == 404
    assert queen.proc.proc is not None
    assert queen.proc.proc.poll() is None  # the queen was left alone
    os.kill(queen.proc.pid, 0)


def test_with_a_token_only_health_is_open(start_hive: HiveStarter) -> None:
    hive = start_hive(env={"RBEE_TOKEN": "s3cret"})
    assert httpx.get(f"{hive.url}/health").status_code == 200
    assert httpx.get(f"{hive.url}/v1/models").status_code == 401
    headers = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{hive.url}/v1/models", headers=headers).status_code == 200


async def test_download_streams_progress_and_lands_in_the_catalog(
    start_hive: HiveStarter, hub_root: Path, tmp_path: Path
) -> None:
    data = gguf_bytes(2 * 1024 * 1024 + 5)
    (hub_root / "acme" / "Small-GGUF").mkdir(parents=True)
    (hub_root / "acme" / "Small-GGUF" / "small.Q8_0.gguf").write_bytes(data)
    hive = start_hive()

    async with HiveClient(hive.url) as client:
        created = await client.start_download("acme/Small-GGUF:small.Q8_0.gguf")
        events = [e async for e in client.job_events(created.job_id)]
        models = {m.id: m for m in await client.models()}

    progress = [e for e in events if e.type == "progress"]
    assert progress[-1].bytes_done == progress[-1].bytes_total == len(data)
    assert events[-1].type == "done"
    model = models["acme/Small-GGUF:small.Q8_0.gguf"]
    assert model.size_bytes == len(data)
    assert await asyncio.to_thread(Path(model.path).read_bytes) == data


async def test_a_cancelled_download_leaves_nothing(
    start_hive: HiveStarter, hub_root: Path, tmp_path: Path
) -> None:
    (hub_root / "acme" / "Big-GGUF").mkdir(parents=True)
    (hub_root / "acme" / "Big-GGUF" / "big.stall.gguf").write_bytes(gguf_bytes(1024 * 1024))
    hive = start_hive()

    async with HiveClient(hive.url) as client:
        created = await client.start_download("acme/Big-GGUF:big.stall.gguf")
        events = []
        async for event in client.job_events(created.job_id):
            events.append(event)
            if event.type == "progress" and (event.bytes_done or 0) > 0:
                assert (await client.cancel_job(created.job_id)).status == "cancelled"
        ids = [m.id for m in await client.models()]
        with pytest.raises(HiveError) as missing:
            await client.delete_model("acme/Big-GGUF:big.stall.gguf")

    assert (events[-1].type, events[-1].code) == ("error", "cancelled")
    assert "acme/Big-GGUF:big.stall.gguf" not in ids
    assert missing.value.status == 404
    models_dir = tmp_path / "models"
    assert [p for p in models_dir.rglob("*") if p.is_file()] == []


def test_a_worker_whose_engine_hangs_stops_by_itself_well_within_the_stop_grace(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    """A worker's llama-server stops answering (frozen) while it serves a request; the hive
    stops the worker. The worker aborts the stuck answer and ends its engine itself, before
    the hive's SIGKILL (10 s): the stop says SIGTERM and the engine's socket folder is gone."""
    hive = start_hive()
    spawned = spawn(hive.url, slots=1)
    wait_for("the worker to answer", lambda: serves(spawned["url"]), timeout_s=120)
    [engine] = psutil.Process(spawned["pid"]).children()
    folders = list(Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{spawned['pid']}-*"))
    assert len(folders) == 1, folders
    engine.suspend()
    chat = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    answers: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{spawned['url']}/v1/chat/completions", json=chat, timeout=120)
        ),
        daemon=True,
    )
    asking.start()
    wait_for(
        "the request to take the slot",
        lambda: httpx.get(f"{spawned['url']}/health", timeout=5).json().get("in_flight") == 1,
    )
    stopped = httpx.post(f"{hive.url}/v1/workers/{spawned['pid']}/stop", json={}, timeout=60)
    assert stopped.json()["signal"] == "SIGTERM", stopped.text
    asking.join(60)
    assert answers, "the client got an answer"
    assert answers[0].status_code == 503, answers[0].text
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert not folders[0].exists(), "the engine's socket folder is removed"
