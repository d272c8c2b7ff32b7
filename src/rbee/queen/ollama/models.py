"""Ollama's model listings (`/api/tags`, `/api/ps`, `/api/show`) from what the queen knows of
its models: the hives' footprints and the workers' `/v1/models` cards. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from rbee.contracts.hives import ModelFootprint
from rbee.queen.ollama.answers import timestamp

# A pinned model's `expires_at`, far in the future as Ollama shows a keep_alive of -1.
NEVER = datetime(2318, 1, 1, tzinfo=UTC)


def details() -> dict[str, Any]:
    """Ollama's `details`: rbee serves GGUF files and reads no more of them than it needs."""
    return {"format": "gguf", "family": "", "families": None, "parameter_size": "",
            "quantization_level": ""}  # fmt: skip


def size_of(footprint: ModelFootprint | None) -> int:
    return footprint.weights_bytes if footprint else 0


def tag_entry(model: str, footprint: ModelFootprint | None) -> dict[str, Any]:
    """A model of `/api/tags`: one a worker serves or a hive could start."""
    return {"name": model, "model": model, "size": size_of(footprint),
            "details": details()}  # fmt: skip


def ps_entry(
    model: str,
    footprint: ModelFootprint | None,
    serving: Mapping[str, Any],
    on_gpu: bool,
    now: datetime,
) -> dict[str, Any]:
    """A loaded model of `/api/ps`, from its `/v1/models` card's `rbee` block: when it unloads
    if nothing asks for it (never, for a pinned one or one kept by min_replicas)."""
    left = serving.get("keep_alive_left_s")
    expires = NEVER if left is None or math.isinf(left) else now + timedelta(seconds=left)
    size = size_of(footprint)
    return {
        "name": model,
        "model": model,
        "size": size,
        "size_vram": size if on_gpu else 0,
        "expires_at": timestamp(expires),
        "details": details(),
    }


def show_answer(model: str, footprint: ModelFootprint | None) -> dict[str, Any]:
    """`/api/show`: rbee serves any model for chat (tools included: the model's own template
    or a grammar) and, on workers started for them, embeddings."""
    info: dict[str, Any] = {"general.architecture": "", "general.name": model}
    if footprint is not None:
        info.update(
            {
                "general.block_count": footprint.layers,
                "general.vocab_size": footprint.vocab_size,
                "general.head_count": footprint.head_count,
                "general.weights_bytes": footprint.weights_bytes,
            }
        )
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(),
        "model_info": info,
        "capabilities": ["completion", "tools", "embedding"],
    }
