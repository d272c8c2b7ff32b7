"""How much memory a model needs on the device it runs on: a pure estimate from its GGUF header.

weights + KV cache + compute buffers, where
- weights are every tensor of the file (on a GPU, the offloaded layers' share of them);
- the KV cache is K and V for every token of every slot's context, stored as a worker stores
  it (`kv_cache_type`): f16 for one slot, q8_0 (34 bytes per 32 values) for several when the
  model's heads are whole q8_0 blocks;
- the compute buffer is what llama.cpp allocates for one 512-token batch: its logits over the
  vocabulary and the attention scores against the whole cache, in f32. Flash attention makes
  the latter smaller, so this errs on the safe side.

It is an estimate for placement (will it fit, and where is there most room), not an allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee.contracts.hives import ModelFootprint
from rbee.contracts.workers import KvCacheType

BATCH_TOKENS = 512  # llama.cpp's default micro-batch (n_ubatch)
F32 = 4
GIB = 1 << 30
Q8_0_BLOCK = 32  # values per block of q8_0 ...
Q8_0_BLOCK_BYTES = 34  # ... stored as 32 bytes and an f16 scale
F16 = 2


def kv_cache_type(setting: str, slots: int, quantizable: bool) -> str:
    """How a worker stores its KV cache. `auto`: q8_0 where it buys room for several slots (one
    slot keeps f16, which decodes a few percent faster); a model whose heads are not whole q8_0
    blocks keeps f16 whatever was asked, since llama.cpp refuses q8_0 for it."""
    if not quantizable:
        return "f16"
    if setting != "auto":
        return setting
    return "q8_0" if slots > 1 else "f16"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    ctx_size: int
    slots: int
    kv_type: str = "f16"

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def describe(self) -> str:
        return (
            f"about {gib(self.total)} (weights {gib(self.weights)} + KV cache "
            f"{gib(self.kv_cache)} for {self.ctx_size} tokens x {self.slots} slot(s) at "
            f"{self.kv_type} + "
            f"compute {gib(self.compute)})"
        )


def gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def estimate_memory(
    footprint: ModelFootprint,
    *,
    ctx_size: int,
    slots: int = 1,
    gpu_layers: int | None = None,
    kv_cache_setting: KvCacheType = "auto",
) -> MemoryEstimate:
    """Memory one worker needs on its device. `gpu_layers` K < all: a GPU holding K layers.
    The KV cache is stored as the worker's `--kv-cache-type kv_cache_setting` will store it."""
    layers = footprint.layers
    kv_type = kv_cache_type(kv_cache_setting, slots, footprint.kv_quantizable)
    kv_per_token = footprint.kv_bytes_per_token
    if kv_type == "q8_0":
        kv_per_token = kv_per_token // F16 * Q8_0_BLOCK_BYTES // Q8_0_BLOCK
    share = 1.0 if gpu_layers is None or gpu_layers < 0 else min(gpu_layers, layers) / layers
    tokens = ctx_size * slots
    compute = F32 * BATCH_TOKENS * (footprint.vocab_size + footprint.head_count * tokens)
    return MemoryEstimate(
        weights=round(footprint.weights_bytes * share),
        kv_cache=round(kv_per_token * tokens * share),
        compute=compute,
        ctx_size=ctx_size,
        slots=slots,
        kv_type=kv_type,
    )
