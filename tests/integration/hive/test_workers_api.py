"""Spawning, listing and stopping workers through the hive's API, with real stand-in processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import psutil

from rbee.contracts.hive_api import SpawnRequest
from rbee.hive.supervisor import SPAWN_MARKER

from .conftest import HIVE_ID, Hive, HiveFactory


async def test_spawned_worker_answers_and_is_listed_from_the_os(hive: Hive) -> None:
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))

    assert spawned.port in hive.settings.port_range
    assert spawned.url == f"http://127.0.0.1:{spawned.port}"
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{spawned.url}/health")).json()
    assert health["worker_id"] == spawned.worker_id
    [listed] = await hive.client.workers()
    assert (listed.pid, listed.worker_id, listed.port) == (
        spawned.pid,
        spawned.worker_id,
        spawned.port,
    )
    assert listed.model == "acme/tiny-GGUF:tiny.Q4_0.gguf"
    assert listed.memory_bytes > 0
    assert listed.uptime_s >= 0


async def test_worker_gets_its_identity_as_arguments_and_the_token_only_in_its_environment(
    make_hive: HiveFactory,
) -> None:
    async with make_hive(
        token="s3cret", advertise_host="node7.lan", allowed_host=["node7.lan"]
    ) as hive:
        spawned = await hive.client.spawn(
            SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf", worker_id="w-1")
        )
        proc = psutil.Process(spawned.pid)
        cmdline = proc.cmdline()

    assert spawned.url == f"http://node7.lan:{spawned.port}"
    for flag, value in [
        ("--queen-url", "http://127.0.0.1:9"),
        ("--hive-id", HIVE_ID),
        ("--worker-id", "w-1"),
        ("--advertise-host", "node7.lan"),
        ("--port", str(spawned.port)),
        ("--model-id", "acme/tiny-GGUF:tiny.Q4_0.gguf"),
        ("--allowed-host", "node7.lan"),
    ]:
        assert cmdline[cmdline.index(flag) + 1] == value
    assert not any("s3cret" in arg for arg in cmdline)


async def test_workers_run_in_their_own_session(hive: Hive) -> None:
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
    assert os.getsid(spawned.pid) == spawned.pid != os.getsid(0)
    assert psutil.Process(spawned.pid).environ()[SPAWN_MARKER] == HIVE_ID


async def test_stop_ends_the_worker_and_it_leaves_the_list(hive: Hive) -> None:
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))

    stopped = await hive.client.stop_worker(spawned.pid)

    assert (stopped.worker_id, stopped.signal) == (spawned.worker_id, "SIGTERM")
    assert not psutil.pid_exists(spawned.pid) or (
        psutil.Process(spawned.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert await hive.client.workers() == []


async def test_a_stop_naming_another_worker_id_signals_nothing(hive: Hive) -> None:
    # The queen stops a worker by the pid its heartbeats carried; had that worker exited and
    # its pid gone to a new worker, the stop must not hit the new one.
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))

    url = f"/v1/workers/{spawned.pid}/stop?worker_id=someone-else"
    response = await hive.http.post(url, json={})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_a_worker"
    assert [w.pid for w in await hive.client.workers()] == [spawned.pid]
    stopped = await hive.client.stop_worker(spawned.pid, spawned.worker_id)
    assert stopped.worker_id == spawned.worker_id
    assert await hive.client.workers() == []


async def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(
    make_hive: HiveFactory,
) -> None:
    async with make_hive(stop_grace=0.5) as hive:
        spawned = await hive.client.spawn(SpawnRequest(model="stubborn.gguf"))
        stopped = await hive.client.stop_worker(spawned.pid)
        assert stopped.signal == "SIGKILL"
        assert await hive.client.workers() == []


async def test_a_pid_that_is_not_a_worker_of_this_hive_is_refused_and_left_alone(
    hive: Hive, make_hive: HiveFactory
) -> None:
    response = await hive.http.post(f"/v1/workers/{os.getpid()}/stop", json={})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_a_worker"
    assert (await hive.http.post("/v1/workers/999999999/stop", json={})).status_code == 404

    # A worker of another hive on the same machine is not this hive's to stop.
    async with make_hive(hive_id="hive-b") as other:
        theirs = await other.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
        assert (await hive.http.post(f"/v1/workers/{theirs.pid}/stop", json={})).status_code == 404
        assert await hive.client.workers() == []
        assert [w.pid for w in await other.client.workers()] == [theirs.pid]


async def test_a_worker_that_dies_at_start_is_an_error_carrying_its_output(hive: Hive) -> None:
    response = await hive.http.post("/v1/workers/spawn", json={"model": "broken.gguf"})

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "worker_start_failed"
    assert "exited with code 3" in error["message"]
    assert "invalid GGUF magic" in error["message"]
    assert await hive.client.workers() == []


async def test_unknown_and_bad_models_and_devices_are_refused(hive: Hive) -> None:
    async def spawn(body: dict[str, object]) -> httpx.Response:
        return await hive.http.post("/v1/workers/spawn", json=body)

    assert (await spawn({"model": "no-such-model"})).status_code == 404
    assert (await spawn({"model": "acme/tiny-GGUF:missing.gguf"})).status_code == 404
    assert (await spawn({"model": "../../../etc/passwd"})).status_code == 400
    assert (await spawn({"model": "/etc/passwd"})).status_code == 400
    assert (await spawn({"model": "--help"})).status_code == 400
    assert (await spawn({"model": "notes.txt"})).status_code == 404
    bad_device = await spawn({"model": "broken.gguf", "device": "cuda:7"})
    assert bad_device.status_code == 400
    assert "cpu:0" in bad_device.json()["error"]["message"]
    assert (await spawn({"model": "broken.gguf", "worker_id": "-x"})).status_code == 400
    assert (await spawn({"model": "broken.gguf", "slots": 0})).status_code == 400
    bad_kv = await spawn({"model": "broken.gguf", "kv_cache_type": "q4_0"})
    assert bad_kv.status_code == 400
    assert "q8_0" in bad_kv.text  # the error names the values it takes
    assert await hive.client.workers() == []


async def test_no_free_port_is_503(make_hive: HiveFactory) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        async with make_hive(worker_ports=f"{port}-{port}") as hive:
            response = await hive.http.post(
                "/v1/workers/spawn", json={"model": "acme/tiny-GGUF:tiny.Q4_0.gguf"}
            )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_free_port"


async def test_two_workers_get_two_ports_and_a_duplicate_id_is_a_conflict(hive: Hive) -> None:
    first = await hive.client.spawn(
        SpawnRequest(model="acme/tiny-GGUF/tiny.Q4_0.gguf", worker_id="w")
    )
    second = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
    assert first.port != second.port
    again = await hive.http.post(
        "/v1/workers/spawn", json={"model": "stubborn.gguf", "worker_id": "w"}
    )
    assert again.status_code == 409
    assert sorted(w.pid for w in await hive.client.workers()) == sorted([first.pid, second.pid])


async def test_worker_output_goes_to_the_log_dir(hive: Hive) -> None:
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
    assert (Path(hive.settings.log_dir) / f"worker-{spawned.worker_id}.log").is_file()


async def test_spawn_with_embedding_starts_the_worker_for_embeddings(hive: Hive) -> None:
    plain = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
    embedding = await hive.client.spawn(
        SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf", embedding=True)
    )
    assert "--embedding" not in psutil.Process(plain.pid).cmdline()
    assert "--embedding" in psutil.Process(embedding.pid).cmdline()
    reranker = await hive.client.spawn(
        SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf", rerank=True)
    )
    assert "--rerank" in psutil.Process(reranker.pid).cmdline()


async def test_spawn_passes_the_kv_cache_type_to_the_worker(hive: Hive) -> None:
    model = "acme/tiny-GGUF:tiny.Q4_0.gguf"
    default = await hive.client.spawn(SpawnRequest(model=model))
    q8 = await hive.client.spawn(SpawnRequest(model=model, kv_cache_type="q8_0"))
    assert "--kv-cache-type" not in psutil.Process(default.pid).cmdline()
    cmdline = psutil.Process(q8.pid).cmdline()
    assert cmdline[cmdline.index("--kv-cache-type") + 1] == "q8_0"
