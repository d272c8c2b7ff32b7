"""A whole cluster over HTTPS: a certificate authority and a server certificate made here with
openssl, a queen on TLS, a hive and a SmolLM2 worker joining it over TLS, the `rbee` CLI and a
chat request through it. Every client trusts the CA through the standard SSL_CERT_FILE."""

from __future__ import annotations

import json
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from httpx_sse import connect_sse

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT
from rbee_testing.processes import ServerProcess, console_script, free_port

pytestmark = pytest.mark.e2e
TOKEN = "tls-cluster-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), the server valid for 127.0.0.1."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=rbee test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key"),
        *("-out", "server.csr", "-subj", "/CN=127.0.0.1"),
    )
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext"),
    )
    return where / "ca.pem", where / "server.pem", where / "server.key"


@dataclass
class TlsCluster:
    queen_url: str
    hive_id: str
    ca: Path
    queen: ServerProcess
    hive: ServerProcess

    def client(self, timeout_s: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.queen_url, headers=AUTH, timeout=timeout_s)


def run_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Run a queen job to its end; its final event."""
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    with connect_sse(client, "GET", created.json()["sse_url"]) as source:
        final: dict[str, Any] = [json.loads(e.data) for e in source.iter_sse()][-1]
    return final


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[TlsCluster]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(tmp)
    # This test process (its httpx clients) and every daemon trust the test CA, and only it.
    monkeypatch_module.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch_module.setenv("RBEE_TOKEN", TOKEN)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    queen_port, hive_port = free_port(), free_port()
    first = random.randrange(20000, 40000)
    queen_url = f"https://127.0.0.1:{queen_port}"
    hive_id = f"tls-hive-{hive_port}"
    queen = ServerProcess(
        [
            console_script("queen-rbee"),
            "--port",
            str(queen_port),
            "--data-dir",
            str(tmp / "q"),
            *tls,
        ],
        health_url=f"{queen_url}/health",
    )
    hive = ServerProcess(
        [
            console_script("rbee-hive"),
            "--queen-url", queen_url,
            "--port", str(hive_port),
            "--hive-id", hive_id,
            "--models-dir", str(tmp / "models"),
            "--log-dir", str(tmp / "logs"),
            "--worker-ports", f"{first}-{first + 20}",
            "--heartbeat-interval", "1",
            *tls,
        ],
        health_url=f"https://127.0.0.1:{hive_port}/health",
    )  # fmt: skip
    with queen, hive:
        cluster = TlsCluster(queen_url, hive_id, ca, queen, hive)
        with cluster.client() as client:
            deadline = time.monotonic() + 30
            while not any(h["id"] == hive_id for h in client.get("/v1/hives").json()["hives"]):
                assert time.monotonic() < deadline, "the hive never reached the queen over TLS"
                time.sleep(0.2)
            spawn = {"operation": "worker_spawn", "model": DEFAULT_MODEL, "hive_id": hive_id}
            final = run_job(client, spawn)
            assert final["type"] == "done", final
        yield cluster
        # Stop the worker and wait for it: the hive forgets its workers, so one left behind
        # here would outlive the test.
        with cluster.client() as client:
            for worker in client.get("/v1/workers").json()["workers"]:
                run_job(client, {"operation": "worker_stop", "worker_id": worker["id"]})


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_worker_joined_over_tls_and_a_chat_goes_through(tls_cluster: TlsCluster) -> None:
    with tls_cluster.client() as client:
        (worker,) = client.get("/v1/workers").json()["workers"]
        assert (worker["scheme"], worker["host"]) == ("https", "127.0.0.1")
        assert worker["status"] == "ready"
        hives = client.get("/v1/hives").json()["hives"]
        assert [h["url"][:8] for h in hives] == ["https://"]
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": DEFAULT_MODEL,
                "temperature": 0,
                "max_tokens": 24,
                "messages": [
                    {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
            },
        )
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]


def test_plain_http_and_unknown_cas_get_nowhere(tls_cluster: TlsCluster) -> None:
    plain = tls_cluster.queen_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/health", timeout=5)
    # A client that trusts only the usual public CAs refuses the test certificate.
    public_only = ssl.create_default_context(cafile=certifi.where())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_cluster.queen_url}/health", verify=public_only, timeout=5)


def test_the_cli_and_an_api_key_work_over_tls(tls_cluster: TlsCluster, tmp_path: Path) -> None:
    rbee = [console_script("rbee")]
    env_url = ["--queen-url", tls_cluster.queen_url]
    status = subprocess.run(
        [*rbee, *env_url, "status", "--json"], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["workers"][0]["status"] == "ready"

    created = subprocess.run(
        [*rbee, *env_url, "key", "create", "tls-user", "--expires-days", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("rbee_sk_")
    body: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=tls_cluster.queen_url, headers=headers, timeout=120) as as_key:
        assert as_key.post("/v1/chat/completions", json=body).status_code == 200
        assert as_key.get("/v1/workers").status_code == 403

    listed = subprocess.run(
        [*rbee, *env_url, "key", "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "tls-user" in listed.stdout
    assert key not in listed.stdout
    revoked = subprocess.run(
        [*rbee, *env_url, "key", "revoke", "tls-user"], capture_output=True, text=True, timeout=60
    )
    assert revoked.returncode == 0, revoked.stderr
    with httpx.Client(base_url=tls_cluster.queen_url, headers=headers, timeout=30) as as_key:
        assert as_key.post("/v1/chat/completions", json=body).status_code == 401
    # Neither the key nor the token reached any daemon's output.
    for daemon in (tls_cluster.queen, tls_cluster.hive):
        assert key not in daemon.output()
        assert TOKEN not in daemon.output()
