"""An in-process hive (with an in-process queen behind it) that starts real stand-in workers.

The stand-in worker is an executable named `llm-worker-rbee`, so the hive recognises it the way
it recognises the real one. It serves `/health`, and its model file's name picks a behaviour:
`broken*` exits at start with an error, `stubborn*` ignores SIGTERM, `sleepy*` never gets
ready.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.clients.hive import HiveClient
from rbee.common.tokens import auth_headers
from rbee.hive.app import create_app
from rbee.hive.settings import HiveSettings
from rbee.hive.state import HiveState
from rbee.queen.app import create_app as create_queen
from rbee.queen.settings import QueenSettings
from rbee_testing.processes import ServerProcess, free_port

# Unique per test run: a hive finds (and the fixture stops) its workers by this id across the
# whole machine, so two runs sharing one id would stop each other's workers.
HIVE_ID = f"hive-a-{os.getpid()}"
STANDIN_HUB = Path(__file__).parents[2] / "e2e" / "hive" / "standin_hub.py"

FAKE_WORKER = """\
import argparse, json, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model", "--host", "--worker-id"):
    parser.add_argument(flag)
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
if "broken" in args.model:
    print("loading", args.model, flush=True)
    print("error: cannot load model: invalid GGUF magic", flush=True)
    sys.exit(3)
if "sleepy" in args.model:  # loads for ever: never answers /health
    signal.pause()


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "worker_id": args.worker_id}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer((args.host, args.port), Health)
if "stubborn" in args.model:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
server.serve_forever()
"""


@pytest.fixture
def worker_command(tmp_path: Path) -> str:
    path = tmp_path / "bin" / "llm-worker-rbee"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / "acme" / "tiny-GGUF").mkdir(parents=True)
    (models / "acme" / "tiny-GGUF" / "tiny.Q4_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    for name in ("broken.gguf", "stubborn.gguf", "notes.txt"):
        (models / name).write_bytes(b"GGUF" + bytes(10))
    return models


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in Hub's files; shared by the session, so tests publish distinct names."""
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="session")
def hub(hub_root: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, str(STANDIN_HUB), "--port", str(port), "--root", str(hub_root)]
    with ServerProcess(args, health_url=f"{url}/health"):
        yield url


def publish(hub_root: Path, repo: str, filename: str, data: bytes) -> None:
    """Put a file on the stand-in Hub."""
    path = hub_root.joinpath(*repo.split("/"), filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass
class Hive:
    client: HiveClient
    http: httpx.AsyncClient  # raw access, for status codes and bodies
    transport: httpx.AsyncBaseTransport  # to the hive app, for a queen of the test's own
    queen: httpx.AsyncClient
    state: HiveState
    settings: HiveSettings


HiveFactory = Callable[..., contextlib.AbstractAsyncContextManager[Hive]]


@pytest.fixture
def make_hive(tmp_path: Path, worker_command: str, models_dir: Path, hub: str) -> HiveFactory:
    """Builds a hive app with its lifespan running; settings overrides as keyword arguments,
    and `nvml`/`llama_server` to fake the GPUs and the llama.cpp build."""

    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Hive]:
        fakes = {
            name: overrides.pop(name) for name in ("nvml", "llama_server") if name in overrides
        }
        first = free_port()
        values: dict[str, Any] = {
            "queen_url": "http://127.0.0.1:9",
            "hive_id": HIVE_ID,
            "models_dir": models_dir,
            "log_dir": tmp_path / "logs",
            "worker_ports": f"{first}-{min(first + 20, 65535)}",
            "worker_command": worker_command,
            "heartbeat_interval": 60,
            "stop_grace": 5,
            "spawn_timeout": 30,
            **overrides,
        }
        settings = HiveSettings.model_validate(values)
        queen_app = create_queen(QueenSettings())
        queen_transport = httpx.ASGITransport(app=queen_app)
        app = create_app(settings, queen_transport=queen_transport, hf_endpoint=hub, **fakes)
        transport = httpx.ASGITransport(app=app)
        headers = auth_headers(settings.token)
        async with (
            app.router.lifespan_context(app),
            HiveClient("http://127.0.0.1:9", token=settings.token, transport=transport) as client,
            httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1:9", headers=headers
            ) as raw,
            httpx.AsyncClient(transport=queen_transport, base_url="http://127.0.0.1:9") as queen,
        ):
            state: HiveState = app.state.hive
            try:
                yield Hive(client, raw, transport, queen, state, settings)
            finally:
                for worker in state.supervisor.processes():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc = psutil.Process(worker.pid)
                        proc.kill()
                        proc.wait(10)
                state.supervisor.reap()

    return make


@pytest.fixture
async def hive(make_hive: HiveFactory) -> AsyncIterator[Hive]:
    async with make_hive() as made:
        yield made
