"""Split placement: a model that fits on no one device goes over several, the fewest that hold it."""

from __future__ import annotations

import pytest

from rbee.common.errors import InsufficientMemory
from rbee.contracts.hives import Device, HiveView, ModelFootprint
from rbee.queen.scheduler.placement import Demand
from rbee.queen.scheduler.split import SPLIT_FLAG, SPLIT_SETTING, plan_split

GIB = 1 << 30
MODEL = "org/repo:model.gguf"
# 4 GiB of weights, 32 layers, 128 KiB of KV cache per token: 4.25 GiB to share out at 2048
# tokens, plus about 0.32 GiB on each device (its compute buffer and a layer's slack).
FOOTPRINT = ModelFootprint(
    weights_bytes=4 * GIB, layers=32, kv_bytes_per_token=128 << 10, vocab_size=32000, head_count=32
)
BODY = 4 * GIB + (128 << 10) * 2048


def cpu(free_gib: float, *, limit_gib: float | None = None, used_gib: float = 0) -> Device:
    return Device(
        id="cpu:0",
        kind="cpu",
        name="cpu",
        cores=8,
        memory_total_bytes=64 * GIB,
        memory_free_bytes=int(free_gib * GIB),
        memory_limit_bytes=None if limit_gib is None else int(limit_gib * GIB),
        rbee_used_bytes=None if limit_gib is None else int(used_gib * GIB),
    )


def gpu(index: int, free_gib: float) -> Device:
    return Device(
        id=f"cuda:{index}",
        kind="cuda",
        name="NVIDIA RTX",
        memory_total_bytes=24 * GIB,
        memory_free_bytes=int(free_gib * GIB),
    )


def hive(hive_id: str, *devices: Device, model: bool = True) -> HiveView:
    return HiveView(
        id=hive_id,
        url=f"http://{hive_id}:7835",
        version="0",
        devices=list(devices),
        models=[MODEL] if model else [],
        footprints={MODEL: FOOTPRINT} if model else {},
        online=True,
        last_seen_s=1.0,
        timestamp="2026-01-01T00:00:00Z",
    )


DEMAND = Demand(model=MODEL, ctx_size=2048, slots=1)


def layout(plan: object) -> list[tuple[str, str]]:
    return [(p.hive_id, p.device.id) for p in plan.parts]  # type: ignore[attr-defined]


def test_two_gpus_of_one_hive_hold_it_as_one_process_before_any_other_hive() -> None:
    hives = [
        hive("big", cpu(1), gpu(0, 3), gpu(1, 3)),
        # Two hives with a GPU each could hold it too, but over the network.
        hive("left", cpu(1), gpu(0, 4)),
        hive("right", cpu(1), gpu(0, 4), model=False),
    ]
    plan = plan_split(hives, DEMAND)
    assert plan.main.id == "big"
    assert layout(plan) == [("big", "cuda:0"), ("big", "cuda:1")]
    assert plan.remote == ()
    assert plan.device == "cuda:0"
    assert plan.gpu_layers() == -1  # every layer on the GPUs
    assert plan.tensor_split() == [0.5, 0.5]
    assert sum(p.bytes for p in plan.parts) == BODY


def test_the_gpus_share_in_proportion_to_their_room() -> None:
    plan = plan_split([hive("big", cpu(1), gpu(0, 2.32), gpu(1, 4.32), gpu(2, 1))], DEMAND)
    # cuda:1 has twice the room of cuda:0 once each keeps 0.32 GiB for itself; the third GPU
    # is not needed. The device with the most room comes first: it is the main one.
    assert layout(plan) == [("big", "cuda:1"), ("big", "cuda:0")]
    first, second = plan.tensor_split()
    assert first == pytest.approx(2 * second, rel=0.02)


def test_several_hives_the_fewest_that_hold_it_with_the_roomiest_as_the_main_one() -> None:
    hives = [
        hive("a", cpu(2.5)),
        hive("b", cpu(3.0)),
        hive("c", cpu(1.0)),
        hive("d", cpu(2.8), model=False),  # can lend memory, but cannot run the worker
    ]
    plan = plan_split(hives, DEMAND)
    assert plan.main.id == "b"
    assert layout(plan) == [("b", "cpu:0"), ("d", "cpu:0")]
    assert plan.helpers == ("d",)
    assert sum(p.bytes for p in plan.parts) == BODY
    for part, free in zip(plan.parts, (3.0, 2.8), strict=True):
        assert part.bytes <= free * GIB  # no device is given more than it has
    # A CPU main: the RPC device holds the last layers, the main CPU the rest.
    share = plan.remote[0].bytes / BODY
    assert plan.gpu_layers() == round(32 * share)
    assert plan.tensor_split() == [1.0]


def test_gpus_on_other_hives_come_before_cpus() -> None:
    hives = [hive("a", cpu(50), gpu(0, 3)), hive("b", cpu(50), gpu(0, 3), model=False)]
    plan = plan_split(hives, DEMAND)
    assert layout(plan) == [("a", "cuda:0"), ("b", "cuda:0")]
    assert plan.tensor_split() == [0.5, 0.5]  # the remote GPU first, as llama.cpp lists it


def test_three_hives_when_two_are_not_enough() -> None:
    hives = [hive("a", cpu(1.8)), hive("b", cpu(1.8)), hive("c", cpu(1.8))]
    plan = plan_split(hives, DEMAND)
    assert len(plan.parts) == 3
    assert len(plan.helpers) == 2
    assert {plan.main.id, *plan.helpers} == {"a", "b", "c"}


def test_nothing_fits_even_all_together() -> None:
    hives = [hive("a", cpu(1.5)), hive("b", cpu(1.5), model=False)]
    with pytest.raises(InsufficientMemory) as refused:
        plan_split(hives, DEMAND)
    assert "nor split over all 2 devices of 2 hive(s)" in refused.value.message
    assert refused.value.needed_bytes > BODY
    # Both could hold far more when empty: worth asking again later.
    assert refused.value.retry_after_s is not None


def test_memory_limits_count_not_the_machines_free_memory() -> None:
    # 60 GiB free on each machine, but each hive lends rbee's workers 2.5 GiB, of which one
    # worker already holds 0.5 GiB: 2 GiB left each, and the hive reports exactly that.
    hives = [hive(n, cpu(2.0, limit_gib=2.5, used_gib=0.5)) for n in ("a", "b")]
    with pytest.raises(InsufficientMemory) as refused:
        plan_split(hives, DEMAND)
    assert refused.value.retry_after_s is not None  # fits once that worker goes

    roomier = [hive(n, cpu(2.5, limit_gib=2.5)) for n in ("a", "b")]
    plan = plan_split(roomier, DEMAND)
    assert [p.hive_id for p in plan.parts] == ["a", "b"]
    # Starts still in flight take their share of the limit too.
    with pytest.raises(InsufficientMemory):
        plan_split(roomier, DEMAND, {("b", "cpu:0"): GIB})


def test_a_limit_too_small_for_ever_says_so_without_retry() -> None:
    hives = [hive(n, cpu(1.0, limit_gib=1.0)) for n in ("a", "b")]
    with pytest.raises(InsufficientMemory) as refused:
        plan_split(hives, DEMAND)
    assert refused.value.retry_after_s is None


def test_with_splitting_across_hives_off_the_refusal_says_how_to_turn_it_on() -> None:
    hives = [hive("a", cpu(2.5)), hive("b", cpu(3.0))]
    with pytest.raises(InsufficientMemory) as refused:
        plan_split(hives, DEMAND, across_hives=False)
    assert SPLIT_FLAG in refused.value.message
    assert SPLIT_SETTING in refused.value.message
    assert "would split over hives b, a" in refused.value.message
    # The GPUs of one hive are one process: no hive boundary, so that is never off.
    one = [hive("big", cpu(1), gpu(0, 3), gpu(1, 3))]
    assert plan_split(one, DEMAND, across_hives=False).main.id == "big"
