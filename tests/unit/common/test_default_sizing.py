"""The context and slots a worker gets when nobody says: the model's trained context, capped by
the device kind and its memory, with two slots where memory allows; placement starts the worker
with exactly the values it estimated for."""

from __future__ import annotations

import pytest

from rbee.common.bundled import bundled_model_path
from rbee.common.errors import InsufficientMemory
from rbee.common.model_memory import default_sizing, estimate_memory
from rbee.contracts.hives import Device, HiveView, ModelFootprint
from rbee.hive.footprints import read_footprint
from rbee.queen.scheduler.placement import Demand, estimate_for, place

GIB = 1 << 30
MIB = 1 << 20
MODEL = "org/repo:model.gguf"


def footprint(context_length: int | None) -> ModelFootprint:
    """SmolLM2-135M's figures, with the trained context given."""
    return ModelFootprint(
        weights_bytes=96_576_768,
        layers=30,
        kv_bytes_per_token=23_040,
        vocab_size=49_152,
        head_count=9,
        kv_quantizable=True,
        context_length=context_length,
    )


def sizing(fp: ModelFootprint, room: int, **kw: object) -> tuple[int, int]:
    found = default_sizing(fp, room, **kw)  # type: ignore[arg-type]
    return found.ctx_size, found.slots


def test_with_room_a_worker_gets_the_trained_context_and_two_slots() -> None:
    assert sizing(footprint(8192), 64 * GIB) == (8192, 2)


def test_a_cpu_caps_a_long_trained_context_at_8192_and_a_gpu_at_32768() -> None:
    long = footprint(131_072)
    assert sizing(long, 64 * GIB, device_kind="cpu") == (8192, 2)
    assert sizing(long, 64 * GIB, device_kind="cuda") == (32768, 2)


def test_a_short_trained_context_is_kept_whole_and_never_exceeded() -> None:
    assert sizing(footprint(1024), 64 * GIB) == (1024, 2)
    assert sizing(footprint(1024), 0) == (1024, 1)


def test_less_room_halves_the_context_before_giving_up_the_second_slot() -> None:
    fp = footprint(8192)
    need = {
        (c, s): estimate_memory(fp, ctx_size=c, slots=s).total
        for c in (8192, 4096, 2048)
        for s in (1, 2)
    }
    assert sizing(fp, need[(8192, 2)] - 1) == (4096, 2)
    assert sizing(fp, need[(2048, 2)]) == (2048, 2)
    # Not even 2048 tokens x 2 slots (310 MiB): one slot, with the longest context that fits.
    assert sizing(fp, need[(2048, 2)] - 1) == (2048, 1)
    # Two slots of 2048 tokens before one of 4096: a second client is served at once.
    assert sizing(fp, need[(4096, 1)]) == (2048, 2)
    # Nothing fits: the smallest default (2048 tokens, 1 slot), which placement then refuses.
    assert sizing(fp, 0) == (2048, 1)


def test_what_the_user_fixed_stays_and_only_the_rest_is_chosen() -> None:
    fp = footprint(8192)
    assert sizing(fp, 64 * GIB, ctx_size=3000) == (3000, 2)
    assert sizing(fp, 64 * GIB, slots=4) == (8192, 4)
    assert sizing(fp, 0, ctx_size=16384, slots=3) == (16384, 3)


def test_a_model_that_does_not_say_its_context_gets_4096() -> None:
    assert sizing(footprint(None), 64 * GIB) == (4096, 2)


def test_the_bundled_model_says_its_trained_context_and_quantization() -> None:
    path = bundled_model_path("smollm2-135m-instruct")
    if path is None:
        pytest.skip("the bundled SmolLM2 package is not installed")
    found = read_footprint(path)
    assert (found.context_length, found.quantization) == (8192, "Q4_1")


def cpu_hive(free: int, total: int = 64 * GIB) -> HiveView:
    device = Device(
        id="cpu:0",
        kind="cpu",
        name="cpu",
        cores=8,
        memory_total_bytes=total,
        memory_free_bytes=free,
    )
    return HiveView(
        id="h",
        url="http://h:7835",
        version="0",
        devices=[device],
        models=[MODEL],
        footprints={MODEL: footprint(8192)},
        online=True,
        last_seen_s=1.0,
        timestamp="2026-01-01T00:00:00Z",
    )


def test_placement_carries_the_sizing_it_estimated_for() -> None:
    placed = place([cpu_hive(64 * GIB)], Demand(model=MODEL))
    assert (placed.ctx_size, placed.slots) == (8192, 2)
    assert placed.estimate is not None
    assert placed.estimate.total == estimate_memory(footprint(8192), ctx_size=8192, slots=2).total
    asked = place([cpu_hive(64 * GIB)], Demand(model=MODEL, ctx_size=4096, slots=3))
    assert (asked.ctx_size, asked.slots) == (4096, 3)


def test_a_device_with_little_free_memory_gets_a_smaller_default_not_a_refusal() -> None:
    fp = footprint(8192)
    room = estimate_memory(fp, ctx_size=4096, slots=2).total
    placed = place([cpu_hive(room)], Demand(model=MODEL))
    assert (placed.ctx_size, placed.slots) == (4096, 2)


def test_what_fits_nowhere_is_refused_at_the_smallest_default_and_eviction_aims_at_it() -> None:
    fp = footprint(8192)
    smallest = estimate_memory(fp, ctx_size=2048, slots=1).total
    with pytest.raises(InsufficientMemory) as refused:
        place([cpu_hive(smallest - 1)], Demand(model=MODEL))
    assert refused.value.needed_bytes == smallest
    assert "2048 tokens x 1 slot(s)" in refused.value.message
    hive = cpu_hive(smallest - 1)
    need = estimate_for(hive, hive.devices[0], Demand(model=MODEL))
    assert need is not None
    assert need.total == smallest
    # Asked for 8192 tokens: no smaller default is tried, the refusal names what was asked.
    with pytest.raises(InsufficientMemory) as asked:
        place([cpu_hive(smallest + 10 * MIB)], Demand(model=MODEL, ctx_size=8192))
    assert "8192 tokens" in asked.value.message
