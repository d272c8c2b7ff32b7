"""A split worker's llama-server reaches its RPC servers through the tunnels' loopback ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.contracts.hive_api import SpawnRequest
from rbee.contracts.workers import WorkerPart
from rbee.hive.worker_launch import split_flags
from rbee.worker.app import llama_server
from rbee.worker.device import prepare_device
from rbee.worker.engines.llama_process import ServerConfig
from rbee.worker.settings import WorkerSettings
from rbee.worker.split import TunnelEndpoint, parse_endpoint, rpc_args


def test_endpoints_as_hives_report_them() -> None:
    assert parse_endpoint("rbee://198.18.0.3:8100/w1@b") == TunnelEndpoint(
        "198.18.0.3", 8100, "w1@b", tls=False
    )
    assert parse_endpoint("rbee+tls://box.lan:8100/w1@b").tls
    for bad in ("tcp://h:1/n", "rbee://h/n", "rbee://h:1/", "rbee://h:99999/n"):
        with pytest.raises(ValueError, match="not an RPC tunnel endpoint"):
            parse_endpoint(bad)


def test_llama_server_gets_rpc_and_tensor_split_on_loopback_only() -> None:
    config = ServerConfig(
        model=Path("m.gguf"),
        ctx_size=2048,
        slots=1,
        threads=2,
        extra_args=tuple(rpc_args([41001, 41002], [0.25, 0.25, 0.5])),
    )
    args = config.args(Path("/tmp/s.sock"))
    rpc = args[args.index("--rpc") + 1]
    assert rpc == "127.0.0.1:41001,127.0.0.1:41002"
    assert args[args.index("--tensor-split") + 1] == "0.25,0.25,0.5"


def test_the_hive_hands_a_split_workers_tunnels_shares_and_parts_to_it() -> None:
    request = SpawnRequest(
        model="m",
        rpc_tunnels=["rbee://198.18.0.3:8100/w1@b"],
        tensor_split=[0.5],
        parts=[
            WorkerPart(hive_id="a", device="cpu:0", bytes=10),
            WorkerPart(hive_id="b", device="cpu:0", bytes=20),
        ],
    )
    flags = split_flags(request)
    assert flags[flags.index("--rpc-tunnels") + 1] == "rbee://198.18.0.3:8100/w1@b"
    assert '"hive_id":"b"' in flags[flags.index("--parts") + 1]
    assert split_flags(SpawnRequest(model="m")) == []


def test_a_split_worker_on_a_cpu_puts_its_gpu_layers_on_the_rpc_servers() -> None:
    settings = WorkerSettings.model_validate(
        {
            "model": "smollm2-135m-instruct",
            "port": 8080,
            "queen_url": "http://127.0.0.1:7833",
            "device": "cpu:0",
            "gpu_layers": 15,
            "rpc_tunnels": "rbee://198.18.0.3:8100/w1@b",
            "tensor_split": "1",
        }
    )
    engine = llama_server(settings)
    args = engine.config.args(Path("/tmp/s.sock"))
    assert args[args.index("--n-gpu-layers") + 1] == "15"  # not 0, as a CPU worker's are
    # A worker on a CPU alone may still not be given GPU layers.
    assert prepare_device("cpu:0", 15, environ={}) is not None
