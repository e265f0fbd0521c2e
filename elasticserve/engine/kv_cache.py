"""The paged KV cache: one pool of blocks shared by all layers (a sequence holds blocks only in
the layers its shape keeps; the block manager decides which)."""

from __future__ import annotations

import torch

from ..model.config import ModelConfig


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of `block_size` tokens for one layer."""
    return 2 * block_size * config.kv_size * torch.finfo(dtype).bits // 8


def num_blocks_for(
    config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype, max_model_len: int
) -> int:
    """Blocks that fit in `memory_bytes`; a clear error if one full-length request does not."""
    blocks = memory_bytes // block_bytes(config, block_size, dtype)
    need = config.num_layers * -(-max_model_len // block_size)
    if blocks < need:
        per_request = need * block_bytes(config, block_size, dtype)
        raise ValueError(
            f"--kv-cache-memory {memory_bytes / 2**20:.1f} MiB is too small: one request of "
            f"max_model_len={max_model_len} tokens at full depth needs "
            f"{per_request / 2**20:.1f} MiB"
        )
    return int(blocks)


def allocate(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The pool, addressed by slot = block * block_size + offset."""
    # [num_blocks * block_size, 2 (v, k: the order the fused projection makes them), kv, hd]
    shape = (num_blocks * block_size, 2, config.num_kv_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def copy_blocks(cache: torch.Tensor, copies: list[tuple[int, int]], block_size: int) -> None:
    """Copy whole blocks `src -> dst` in the pool (copy-on-write of shared blocks)."""
    # [num_blocks, block_size, 2, kv, hd]: every source is read before any destination is written
    blocks = cache.view(-1, block_size, *cache.shape[1:])
    src = torch.tensor([a for a, _ in copies], device=cache.device)
    dst = torch.tensor([b for _, b in copies], device=cache.device)
    blocks[dst] = blocks[src]
