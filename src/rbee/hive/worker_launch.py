"""What a worker the hive starts is given besides its own flags: the environment it inherits
(what a process needs, never the hive's secrets) and a split worker's flags."""

from __future__ import annotations

import json
from collections.abc import Mapping

from rbee.common.worker_command import SPAWN_MARKER
from rbee.contracts.hive_api import SpawnRequest

# What a worker inherits from the hive's environment: what a process needs to run, find its
# libraries and certificates, and pick its device and threads; never the hive's secrets
# (HF_TOKEN, cloud credentials…). The cluster token is added explicitly.
WORKER_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH"}
    | {"VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR"}
    | {"RBEE_LLAMA_CACHE", "CMAKE_ARGS"}  # where a pip install's llama-server is (engine_build)
)
# RBEE_TEST_: the marks the test suite gives every process it starts, so that its check for
# leftover processes sees the workers a hive started too.
WORKER_ENV_PREFIXES = (
    *("LC_", "OMP_", "GGML_", "LLAMA_", "CUDA_", "HIP_", "ROCR_"),
    *("RBEE_WORKER_", "RBEE_TEST_"),
)


def worker_env(parent: Mapping[str, str], hive_id: str, token: str | None) -> dict[str, str]:
    env = {
        name: value
        for name, value in parent.items()
        if name in WORKER_ENV_NAMES or name.startswith(WORKER_ENV_PREFIXES)
    }
    env[SPAWN_MARKER] = hive_id
    if token:  # in the environment, so it never shows in `ps`
        env["RBEE_TOKEN"] = token
    return env


def split_flags(request: SpawnRequest) -> list[str]:
    """A split worker's flags: its RPC servers, its shares and its parts (issue 24)."""
    if not request.rpc_tunnels:
        return []
    parts = json.dumps([p.model_dump(mode="json") for p in request.parts], separators=(",", ":"))
    return [
        *("--rpc-tunnels", ",".join(request.rpc_tunnels)),
        *("--tensor-split", ",".join(f"{share:g}" for share in request.tensor_split)),
        *("--parts", parts),
    ]
