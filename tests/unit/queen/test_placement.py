"""Placement across hives with mixed devices: GPU first by free VRAM, else CPU; what fits."""

from __future__ import annotations

import pytest

from rbee.common.errors import BadRequest, InsufficientMemory, NotFound, Unavailable
from rbee.contracts.hives import Device, HiveView, ModelFootprint
from rbee.queen.scheduler.placement import Demand, estimate_for, place

GIB = 1 << 30
MODEL = "org/repo:model.gguf"
# 4 GiB of weights, 32 layers, 128 KiB of KV cache per token: 4.25 GiB + compute at 2048 tokens.
FOOTPRINT = ModelFootprint(
    weights_bytes=4 * GIB, layers=32, kv_bytes_per_token=128 << 10, vocab_size=32000, head_count=32
)


def cpu(free_gib: float) -> Device:
    return Device(
        id="cpu:0",
        kind="cpu",
        name="cpu",
        cores=8,
        memory_total_bytes=64 * GIB,
        memory_free_bytes=int(free_gib * GIB),
    )


def gpu(index: int, free_gib: float, problem: str | None = None) -> Device:
    return Device(
        id=f"cuda:{index}",
        kind="cuda",
        name="NVIDIA RTX",
        memory_total_bytes=24 * GIB,
        memory_free_bytes=int(free_gib * GIB),
        problem=problem,
    )


def hive(
    hive_id: str,
    *devices: Device,
    online: bool = True,
    models: tuple[str, ...] = (MODEL,),
    footprint: ModelFootprint | None = FOOTPRINT,
) -> HiveView:
    return HiveView(
        id=hive_id,
        url=f"http://{hive_id}:7835",
        version="0",
        devices=list(devices),
        models=list(models),
        footprints={MODEL: footprint} if footprint else {},
        online=online,
        last_seen_s=1.0,
        timestamp="2026-01-01T00:00:00Z",
    )


def demand(**overrides: object) -> Demand:
    return Demand(**{"model": MODEL, "ctx_size": 2048, **overrides})  # type: ignore[arg-type]


def where(placement: object) -> tuple[str, str]:
    return placement.hive.id, placement.device_id  # type: ignore[attr-defined]


def test_a_gpu_with_room_beats_any_cpu() -> None:
    hives = [hive("workstation", cpu(60)), hive("gamer", cpu(8), gpu(0, 10))]
    placement = place(hives, demand())
    assert where(placement) == ("gamer", "cuda:0")
    assert placement.estimate is not None
    assert placement.estimate.total < 10 * GIB


def test_among_gpus_the_most_free_vram_wins_across_hives() -> None:
    hives = [
        hive("a", cpu(30), gpu(0, 6), gpu(1, 20)),
        hive("b", cpu(30), gpu(0, 12)),
    ]
    assert where(place(hives, demand())) == ("a", "cuda:1")


def test_a_model_too_big_for_every_gpu_goes_to_the_cpu_with_most_ram() -> None:
    hives = [hive("a", cpu(10), gpu(0, 3)), hive("b", cpu(40), gpu(0, 4))]
    assert where(place(hives, demand())) == ("b", "cpu:0")


def test_more_slots_need_more_kv_cache_and_can_tip_a_gpu_over() -> None:
    hives = [hive("a", cpu(40), gpu(0, 5))]
    assert where(place(hives, demand(slots=1))) == ("a", "cuda:0")
    assert where(place(hives, demand(slots=4))) == ("a", "cpu:0")  # +3 GiB of KV cache


def test_partial_offload_fits_a_smaller_card() -> None:
    hives = [hive("a", cpu(2), gpu(0, 3))]
    with pytest.raises(Unavailable):
        place(hives, demand())
    assert where(place(hives, demand(gpu_layers=16))) == ("a", "cuda:0")


def test_a_model_that_fits_nowhere_names_the_biggest_device_and_the_need() -> None:
    hives = [hive("a", cpu(2), gpu(0, 3.5)), hive("b", cpu(1))]
    with pytest.raises(Unavailable) as refused:
        place(hives, demand())
    message = refused.value.message
    assert refused.value.code == "insufficient_memory"
    assert "needs about 4.44 GiB" in message
    assert "weights 4.00 GiB" in message
    assert "the most free memory is 3.50 GiB on cuda:0 of hive a" in message


def test_spawns_in_flight_count_against_the_free_memory() -> None:
    hives = [hive("a", cpu(40), gpu(0, 10), gpu(1, 8))]
    assert where(place(hives, demand())) == ("a", "cuda:0")
    reserved = {("a", "cuda:0"): 5 * GIB}  # a worker is loading there right now
    assert where(place(hives, demand(), reserved)) == ("a", "cuda:1")


def test_unusable_gpus_are_skipped_and_named_when_asked_for() -> None:
    problem = "this llama.cpp build has no CUDA support"
    hives = [hive("a", cpu(40), gpu(0, 20, problem=problem))]
    assert where(place(hives, demand())) == ("a", "cpu:0")
    with pytest.raises(BadRequest, match=r"no worker can run on cuda:0 of hive a: this llama\.cpp"):
        place(hives, demand(device="cuda:0"))


def test_an_asked_for_device_restricts_the_choice() -> None:
    hives = [hive("a", cpu(40), gpu(0, 6)), hive("b", cpu(40), gpu(0, 7))]
    assert where(place(hives, demand(device="cpu:0"))) == ("b", "cpu:0")
    assert where(place(hives, demand(device="cuda:0", hive_id="a"))) == ("a", "cuda:0")


def test_a_device_no_hive_lists_is_left_to_the_only_hive_or_refused_among_many() -> None:
    one = [hive("a", cpu(40))]
    placement = place(one, demand(device="cuda:0"))
    assert where(placement) == ("a", "cuda:0")  # the hive answers why it has no cuda:0
    assert placement.device is None
    two = [hive("a", cpu(40)), hive("b", cpu(40))]
    with pytest.raises(BadRequest, match=r"has device 'cuda:0' \(a: cpu:0; b: cpu:0\)"):
        place(two, demand(device="cuda:0"))


def test_without_an_estimate_the_most_free_memory_still_decides() -> None:
    hives = [hive("a", cpu(40), gpu(0, 1), footprint=None)]
    assert where(place(hives, demand())) == ("a", "cuda:0")


def test_hives_offline_or_without_the_model_are_never_chosen() -> None:
    hives = [
        hive("down", cpu(60), gpu(0, 24), online=False),
        hive("other", cpu(60), gpu(0, 24), models=("something-else",)),
        hive("small", cpu(16)),
    ]
    assert where(place(hives, demand())) == ("small", "cpu:0")
    with pytest.raises(NotFound):
        place(hives[:2], demand())


def test_equal_hives_are_chosen_the_same_way_every_time() -> None:
    hives = [hive("a", cpu(16)), hive("b", cpu(16))]
    assert {where(place(hives, demand())) for _ in range(5)} == {("b", "cpu:0")}


def test_the_kv_cache_type_asked_for_is_the_one_estimated() -> None:
    quantizable = FOOTPRINT.model_copy(update={"kv_quantizable": True})
    # 4 GiB of weights + compute ~0.56 GiB; 4 slots x 2048 tokens of KV cache: 1 GiB at f16,
    # 0.53 GiB at q8_0. A GPU with 5.3 GiB free takes the q8_0 worker, not the f16 one.
    hives = [hive("a", cpu(40), gpu(0, 5.3), footprint=quantizable)]
    auto = place(hives, demand(slots=4))
    f16 = place(hives, demand(slots=4, kv_cache_type="f16"))
    assert (where(auto), where(f16)) == (("a", "cuda:0"), ("a", "cpu:0"))
    assert auto.estimate is not None
    assert f16.estimate is not None
    assert (auto.estimate.kv_type, f16.estimate.kv_type) == ("q8_0", "f16")
    assert auto.estimate.kv_cache == f16.estimate.kv_cache * 34 // 64
    # One slot keeps f16 under auto; q8_0 asked for is estimated as q8_0.
    one = place(hives, demand(slots=1, kv_cache_type="q8_0")).estimate
    assert one is not None
    assert one.kv_type == "q8_0"
    assert "at q8_0" in one.describe()


def test_q8_0_asked_for_a_model_that_cannot_take_it_is_estimated_as_f16() -> None:
    hives = [hive("a", cpu(40))]  # FOOTPRINT's heads are not whole q8_0 blocks
    asked = place(hives, demand(slots=4, kv_cache_type="q8_0")).estimate
    plain = place(hives, demand(slots=4, kv_cache_type="f16")).estimate
    assert asked is not None
    assert plain is not None
    assert asked.kv_type == "f16"
    assert asked.kv_cache == plain.kv_cache


def test_insufficient_memory_carries_the_numbers_and_a_retry_after_when_memory_may_free() -> None:
    hives = [hive("a", cpu(2), gpu(0, 3.5)), hive("b", cpu(1))]
    with pytest.raises(InsufficientMemory) as refused:
        place(hives, demand())
    error = refused.value.body()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["type"] == "server_error"
    estimate = estimate_for(hives[0], hives[0].devices[1], demand())
    assert estimate is not None
    assert error["needed_bytes"] == estimate.total
    assert error["largest_free_bytes"] == int(3.5 * GIB)
    # An emptier GPU would hold it: asking again later can succeed.
    assert refused.value.headers["Retry-After"] == "10"


def test_a_hive_memory_limit_smaller_than_the_model_answers_at_once_without_retry_after() -> None:
    limited = cpu(3).model_copy(update={"memory_limit_bytes": 3 * GIB})
    with pytest.raises(InsufficientMemory) as refused:
        place([hive("a", limited)], demand())
    assert "Retry-After" not in refused.value.headers
    assert "more than any device can hold even when empty" in refused.value.message
    assert refused.value.largest_free_bytes == 3 * GIB
    assert refused.value.needed_bytes > 4 * GIB
