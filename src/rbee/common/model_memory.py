"""How much memory a model needs on the device it runs on: a pure estimate from its GGUF header.

weights + KV cache + compute buffers (+ on a CPU, the worker's own memory), where
- weights are every tensor of the file (on a GPU, the offloaded layers' share of them);
- the KV cache is K and V for every token of every slot's context, stored as a worker stores
  it (`kv_cache_type`): f16 for one slot, q8_0 (34 bytes per 32 values) for several when the
  model's heads are whole q8_0 blocks;
- on a GPU (or a device not known), the compute buffer is what llama.cpp allocates for one
  512-token batch: its logits over the vocabulary and the attention scores against the whole
  cache, in f32. A GPU's allocations are real memory. Flash attention makes the scores smaller,
  so this errs on the safe side;
- on a CPU, llama.cpp reserves that buffer too, but only the pages a batch writes are ever
  taken, and `llama-server` writes the logits of one token per sequence, with flash attention
  (its default there) the scores never whole. What a CPU worker holds beside its weights and
  KV cache is a batch's activations (hidden and feed-forward widths), one row of logits per
  slot, `llama-server`'s own memory (most of it the vocabulary: its tokens, their ids, the
  sampler's candidates) and the worker's Python. Measured as resident memory (what a hive
  counts against its `--memory-limit`) after a 1,760-token prompt: SmolLM2-135M at 2,048 to
  8,192 tokens x 1 or 2 slots held 254-401 MiB, estimated 275-421; Gemma 3 270M (its
  sliding-window layers keep a shorter cache than counted here) 436-457 MiB, estimated
  477-595. A header that does not give the widths (a hive before they were read) gets the
  GPU's estimate;
- the prompt cache is `llama-server`'s copy, in the machine's RAM, of prompts it served that no
  slot holds any more (`--cache-ram`), so that a conversation that comes back after its slot
  served others is restored rather than read again. Left to itself it grows to 8 GiB per
  worker (~40 MiB per 1,800-token prompt of SmolLM2 at f16), past any `--memory-limit`; a
  worker gets as much as its KV cache (`PROMPT_CACHE_SHARE`): as many tokens again as its slots
  hold. It is counted where it lives: on a CPU or an Apple GPU (the machine's memory), not in
  an NVIDIA GPU's. Embedding workers get none (nothing they read comes back).

It is an estimate for placement (will it fit, and where is there most room), not an allocator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rbee.contracts.hives import ModelFootprint
from rbee.contracts.workers import DEFAULT_CTX_SIZE, KvCacheType

BATCH_TOKENS = 512  # llama.cpp's default micro-batch (n_ubatch)
F32 = 4
GIB = 1 << 30
Q8_0_BLOCK = 32  # values per block of q8_0 ...
Q8_0_BLOCK_BYTES = 34  # ... stored as 32 bytes and an f16 scale
F16 = 2
MIB = 1 << 20
# On a CPU, besides weights, KV cache and a batch's buffers (measured, with some margin):
ENGINE_BASE = 32 * MIB  # llama-server's own memory, whatever the model
VOCAB_ENTRY = 320  # ... and per token of the vocabulary (SmolLM2 49k tokens, Gemma 3 262k)
WORKER_PROCESS = 80 * MIB  # the worker's Python (measured ~66 MiB; it grows as it serves)
# A worker's prompt cache, as a share of its KV cache (whole MiB: llama-server's unit).
PROMPT_CACHE_SHARE = 1.0
# Devices whose memory is the machine's RAM, where the prompt cache lives.
RAM_DEVICE_KINDS = frozenset({"cpu", "metal"})


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
    processes: int = 0  # on a CPU: llama-server's own memory and the worker's
    prompt_cache: int = 0  # llama-server's --cache-ram, in bytes
    prompt_cache_here: bool = True  # it is in this device's memory (counted in `total`)

    @property
    def total(self) -> int:
        cache = self.prompt_cache if self.prompt_cache_here else 0
        return self.weights + self.kv_cache + self.compute + self.processes + cache

    def describe(self) -> str:
        processes = f" + processes {gib(self.processes)}" if self.processes else ""
        counted = self.prompt_cache and self.prompt_cache_here
        cache = f" + prompt cache {gib(self.prompt_cache)}" if counted else ""
        return (
            f"about {gib(self.total)} (weights {gib(self.weights)} + KV cache "
            f"{gib(self.kv_cache)} for {self.ctx_size} tokens x {self.slots} slot(s) at "
            f"{self.kv_type} + "
            f"compute {gib(self.compute)}{processes}{cache})"
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
    device_kind: str | None = None,
    embedding: bool = False,
) -> MemoryEstimate:
    """Memory one worker needs on its device (`device_kind`: `cpu`, a GPU's kind, or None when
    not known). `gpu_layers` K < all: a GPU holding K layers. The KV cache is stored as the
    worker's `--kv-cache-type kv_cache_setting` will store it. `embedding`: a worker for
    embeddings or reranking (no prompt cache)."""
    layers = footprint.layers
    kv_type = kv_cache_type(kv_cache_setting, slots, footprint.kv_quantizable)
    kv_per_token = footprint.kv_bytes_per_token
    if kv_type == "q8_0":
        kv_per_token = kv_per_token // F16 * Q8_0_BLOCK_BYTES // Q8_0_BLOCK
    share = 1.0 if gpu_layers is None or gpu_layers < 0 else min(gpu_layers, layers) / layers
    tokens = ctx_size * slots
    compute = F32 * BATCH_TOKENS * (footprint.vocab_size + footprint.head_count * tokens)
    processes = 0
    if device_kind == "cpu" and footprint.embedding_length and footprint.feed_forward_length:
        widths = 4 * footprint.embedding_length + 2 * footprint.feed_forward_length
        compute = F32 * (BATCH_TOKENS * widths + slots * footprint.vocab_size)
        processes = ENGINE_BASE + VOCAB_ENTRY * footprint.vocab_size + WORKER_PROCESS
    # The whole context of every slot, whatever share of the layers a GPU holds: the cache
    # keeps every layer's K and V, in RAM.
    prompt_cache = 0 if embedding else round(kv_per_token * tokens * PROMPT_CACHE_SHARE)
    return MemoryEstimate(
        weights=round(footprint.weights_bytes * share),
        kv_cache=round(kv_per_token * tokens * share),
        compute=compute,
        ctx_size=ctx_size,
        slots=slots,
        kv_type=kv_type,
        processes=processes,
        prompt_cache=prompt_cache // MIB * MIB,
        prompt_cache_here=device_kind is None or device_kind in RAM_DEVICE_KINDS,
    )


# The default context and slots of a worker (`default_sizing`). The longest context per slot a
# worker gets unless asked for more: on a CPU, reading 8k tokens of prompt already takes long
# (SmolLM2-135M: ~10 s on two cores; a 7B model: minutes), so more is for those who ask; a GPU
# reads them fast enough to give a model up to 32k of its trained context.
MAX_DEFAULT_CTX = {"cpu": 8192, "cuda": 32768, "metal": 32768}
# A default context is never cut below this (nor above the model's own), however little room:
# a model that does not fit at it waits for room or is refused, with the numbers.
MIN_DEFAULT_CTX = DEFAULT_CTX_SIZE
# Slots by default where memory allows: a second client is served at once, not queued.
DEFAULT_SLOTS = 2
# A model whose header does not say how long its context is.
UNKNOWN_TRAINED_CTX = 4096


def default_sizing(
    footprint: ModelFootprint,
    room_bytes: int,
    *,
    device_kind: str = "cpu",
    ctx_size: int | None = None,
    slots: int | None = None,
    gpu_layers: int | None = None,
    kv_cache_setting: KvCacheType = "auto",
    embedding: bool = False,
) -> MemoryEstimate:
    """The context and slots of a new worker, as the estimate of the memory it needs (its
    `ctx_size` and `slots` are what to start it with). What the caller fixed stays; the rest is
    the model's trained context capped at `MAX_DEFAULT_CTX` of the device kind, with
    `DEFAULT_SLOTS` slots: the first that fits in `room_bytes`, trying the context halved down
    to `MIN_DEFAULT_CTX` (or the trained context if shorter), then one slot. When nothing
    fits: the smallest of them (placement refuses it, or makes room for it)."""

    def estimate(ctx: int, n: int) -> MemoryEstimate:
        return estimate_memory(
            footprint,
            ctx_size=ctx,
            slots=n,
            gpu_layers=gpu_layers,
            kv_cache_setting=kv_cache_setting,
            device_kind=device_kind,
            embedding=embedding,
        )

    contexts = (
        [ctx_size] if ctx_size is not None else list(_default_contexts(footprint, device_kind))
    )
    counts = [slots] if slots is not None else [DEFAULT_SLOTS, 1]
    for n in counts:
        for ctx in contexts:
            found = estimate(ctx, n)
            if found.total <= room_bytes:
                return found
    return estimate(contexts[-1], counts[-1])


def _default_contexts(footprint: ModelFootprint, device_kind: str) -> Iterator[int]:
    """The trained context up to the device's cap, then halved down to the floor."""
    trained = footprint.context_length or UNKNOWN_TRAINED_CTX
    ctx = min(trained, MAX_DEFAULT_CTX.get(device_kind, MAX_DEFAULT_CTX["cpu"]))
    floor = min(MIN_DEFAULT_CTX, ctx)
    while ctx > floor:
        yield ctx
        ctx = max(floor, ctx // 2)
    yield floor
