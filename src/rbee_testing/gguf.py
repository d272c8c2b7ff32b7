"""Tiny random-weight llama models written in milliseconds, for tests that need a real GGUF file.

The vocabulary is the 256 byte tokens plus `<unk>`, `<s>` and `</s>`: with every byte present,
any text tokenizes (llama.cpp aborts on a byte it has no token for), and the output is noise —
which is all a test of the plumbing needs.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np

N_EMBD = 32
N_HEAD = 2
N_FF = 64


def write_tiny_gguf(
    path: Path,
    *,
    context_length: int = 512,
    n_layers: int = 1,
    chat_template: str | None = None,
    seed: int = 0,
    pooling: int | None = None,
) -> Path:
    """`pooling` (llama.cpp's pooling type, 1 = mean) marks the file as an embedding model."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("rbee-tiny-test")
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    # numpy shapes are (rows=out, cols=in); gguf stores them reversed, as ggml expects.
    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, N_EMBD))
    for layer in range(n_layers):
        blk = f"blk.{layer}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weights(N_EMBD, N_FF))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_truncated_gguf(path: Path, source: Path, keep_fraction: float = 0.5) -> Path:
    """A model file cut short, as an interrupted download leaves it."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def write_garbage_gguf(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """The right magic bytes followed by noise."""
    rng = np.random.default_rng(seed)
    path.write_bytes(b"GGUF" + rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def gguf_bytes(size: int, seed: int | None = None) -> bytes:
    """`size` bytes that a download takes for a GGUF model: a header (version 3, no tensors,
    one key: general.architecture = "llama") and random bytes after it, as a stand-in for the
    weights. Random unless `seed` is given."""
    key, value = b"general.architecture", b"llama"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)  # 8: a string
    header += struct.pack("<Q", len(value)) + value
    rest = max(0, size - len(header))
    noise = os.urandom(rest) if seed is None else random.Random(seed).randbytes(rest)
    return header + noise
