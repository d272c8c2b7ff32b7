"""Tables and numbers as a person reads them. Pure functions: data in, rich renderables out."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from rbee.clients.queen import ModelEntry
from rbee.common.sizes import format_size
from rbee.contracts.hives import Device, HiveView
from rbee.contracts.keys import ApiKeyInfo
from rbee.contracts.workers import WorkerView


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover - the loop always returns


def ago(seconds: float) -> str:
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def worker_state(worker: WorkerView) -> str:
    return worker.status.value if worker.online else "offline"


def worker_address(worker: WorkerView) -> str:
    return worker.url.partition("://")[2]


def _table(*columns: str) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def context_text(worker: WorkerView) -> str:
    """`8192 tokens x 2 slots`: what one request may hold, and how many are served at once."""
    slots = f"{worker.slots} slot{'s' if worker.slots != 1 else ''}"
    return f"{worker.ctx_size} tokens x {slots}" if worker.ctx_size else slots


def worker_hives(worker: WorkerView) -> str:
    """`h1+h2`: the hives a worker runs on, its own first (several for a split worker)."""
    hives = dict.fromkeys([worker.hive_id or "-", *(p.hive_id for p in worker.parts)])
    return "+".join(hives)


def worker_devices(worker: WorkerView) -> str:
    """`cpu:0`; for a split worker each part: `h1:cpu:0 58.2 MB + h2:cpu:0 41.1 MB`."""
    if not worker.parts:
        return worker.device
    return " + ".join(f"{p.hive_id}:{p.device} {human_bytes(p.bytes)}" for p in worker.parts)


def workers_table(workers: Sequence[WorkerView]) -> Table:
    table = _table(
        "WORKER", "MODEL", "STATUS", "LOAD", "CONTEXT", "ADDRESS", "HIVE", "DEVICE", "LAST SEEN"
    )
    for w in workers:
        table.add_row(
            w.id,
            w.model_id,
            worker_state(w),
            f"{w.in_flight}/{w.slots}",
            str(w.ctx_size or "-"),
            worker_address(w),
            worker_hives(w),
            worker_devices(w),
            ago(w.last_seen_s),
        )
    return table


def device_text(device: Device) -> str:
    """A device's id and, under a hive's --memory-limit, what rbee's workers hold of it."""
    if device.memory_limit_bytes is None:
        return device.id
    return (
        f"{device.id} (workers hold {human_bytes(device.rbee_used_bytes)} of "
        f"{format_size(device.memory_limit_bytes)} allowed, "
        f"{human_bytes(device.memory_free_bytes)} free for more)"
    )


def hives_table(hives: Sequence[HiveView]) -> Table:
    table = _table("HIVE", "STATUS", "URL", "DEVICES", "MODELS", "LAST SEEN")
    for h in hives:
        table.add_row(
            h.id,
            "online" if h.online else "offline",
            h.url,
            ", ".join(device_text(d) for d in h.devices) or "-",
            str(len(h.models)),
            ago(h.last_seen_s),
        )
    return table


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def keep_alive_cell(m: ModelEntry) -> str:
    """How long the model stays loaded if no request comes."""
    if m.rbee.state != "loaded":
        return "-"
    if m.rbee.pinned:
        return "pinned"
    left = m.rbee.keep_alive_left_s
    if left is None and m.rbee.min_replicas:
        return f"kept (min {m.rbee.min_replicas})"  # its last workers never unload
    return "?" if left is None else duration(left)


def replicas_cell(m: ModelEntry) -> str:
    """Its loaded workers, and the bounds the queen keeps them within when set."""
    bounds = [f"min {m.rbee.min_replicas}"] if m.rbee.min_replicas else []
    if m.rbee.max_replicas is not None:
        bounds.append(f"max {m.rbee.max_replicas}")
    return f"{m.rbee.workers} ({', '.join(bounds)})" if bounds else str(m.rbee.workers)


def contexts_cell(m: ModelEntry) -> str:
    """Each worker's context and slots, alike ones counted once: `8192x2`, `2x 4096x1`."""
    found = Counter(f"{w.ctx_size or '?'}x{w.slots}" for w in m.rbee.worker_contexts)
    return ", ".join(k if n == 1 else f"{n}x {k}" for k, n in found.items()) or "-"


def models_table(models: Sequence[ModelEntry]) -> Table:
    table = _table(
        "MODEL", "STATE", "REPLICAS", "QUEUED", "KEEP-ALIVE LEFT", "LAST USE",
        "HIVES THAT CAN START IT", "CONTEXT x SLOTS",
    )  # fmt: skip
    for m in models:
        state = f"{m.rbee.state} (embeddings)" if m.rbee.embedding else m.rbee.state
        used = m.rbee.last_used_s_ago
        table.add_row(
            m.id,
            state,
            replicas_cell(m),
            str(m.rbee.queued),
            keep_alive_cell(m),
            "-" if used is None else ("now" if used == 0 else ago(used)),
            ", ".join(m.rbee.hives) or "-",
            contexts_cell(m),
        )
    return table


def backoff_lines(models: Sequence[ModelEntry]) -> list[str]:
    """One line per hive where starting a model is on hold, with the reason."""
    return [
        f"{m.id}: starts on {b.hive_id} on hold for {b.retry_in_s:.0f}s after {b.failures} "
        f"failure(s) in a row; last: {b.reason}"
        for m in models
        for b in m.rbee.backoff
    ]


def catalog_table(models: Iterable[dict[str, Any]]) -> Table:
    table = _table(
        "MODEL", "HIVE", "SIZE", "QUANT", "CONTEXT", "NEEDS (DEFAULT CONTEXT x SLOTS)", "SOURCE"
    )
    for m in models:
        trained = m.get("context_length")
        need = m.get("memory_bytes")
        table.add_row(
            str(m.get("id", "?")),
            str(m.get("hive_id") or "-"),
            human_bytes(m.get("size_bytes")),
            str(m.get("quantization") or "-"),
            str(trained) if trained else "-",
            f"{human_bytes(need)} ({m.get('ctx_size')}x{m.get('slots')})" if need else "-",
            str(m.get("source", "-")),
        )
    return table


def keys_table(keys: Sequence[ApiKeyInfo]) -> Table:
    table = _table("NAME", "CREATED", "EXPIRES", "LAST USED", "REQUESTS", "TOKENS")
    for k in keys:
        table.add_row(
            k.name,
            f"{k.created:%Y-%m-%d %H:%M}",
            f"{k.expires:%Y-%m-%d %H:%M}" if k.expires else "never",
            f"{k.last_used:%Y-%m-%d %H:%M}" if k.last_used else "never",
            str(k.requests),
            str(k.tokens),
        )
    return table


def to_json(data: Any) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(data), indent=2)


def model_names(models: Sequence[ModelEntry]) -> str:
    return ", ".join(m.id for m in models) if models else "none yet"
