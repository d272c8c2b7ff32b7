"""The worker's device: pinned before llama.cpp loads, refused at once if it cannot be used.

`--device cuda:N` on a `llama-server` built without CUDA, or on a machine without GPU N, would
otherwise load the model on the CPU and report a GPU to the queen. Instead the worker exits with one line that
says which, and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from types import ModuleType
from typing import Any

import pynvml

from rbee.common.gpu import (
    build_gpu_backend,
    device_environment,
    device_problem,
    nvidia_gpu_count,
    parse_device,
)


def prepare_device(
    device: str,
    gpu_layers: int | None,
    *,
    llama_server: str | None = None,
    environ: MutableMapping[str, str] = os.environ,
    nvml: ModuleType | Any = pynvml,
) -> str | None:
    """Pin this process (and so its `llama-server`) to `device`, in `environ`; the reason it
    cannot run there, or None. `llama_server` is asked what GPU backend it was built with;
    `nvml` which GPUs there are (tests pass fakes)."""
    ref = parse_device(device)
    if gpu_layers is not None and not ref.is_gpu:
        return f"--gpu-layers needs a GPU --device (cuda:N or metal:0), not {device}"
    # Inherited by llama-server: CUDA reads them when it starts.
    environ.update(device_environment(ref))
    if not ref.is_gpu:
        return None
    gpus, no_gpu_reason = nvidia_gpu_count(nvml) if ref.kind == "cuda" else (0, None)
    problem = device_problem(
        ref,
        build_gpu=build_gpu_backend(llama_server),
        cuda_gpus=gpus,
        no_gpu_reason=no_gpu_reason,
    )
    return None if problem is None else f"--device {device}: {problem}"
