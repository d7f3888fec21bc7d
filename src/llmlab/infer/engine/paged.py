"""Paged keys/values: the pool's tensors, and a per-forward cache object the model uses like a KVCache.

The model calls cache.begin(B, T) once per forward, cache.update(layer, step, k, v) in every attention layer
and cache.commit(step) at the end (llmlab.model.kv_cache documents the contract). PagedBatch implements the
same three calls over block tables, so the model never learns that memory is paged:
  * update writes the new keys/values into their slots (slot = block * block_size + offset), then returns
    each row's whole context gathered into contiguous [B, n_kv_head, L, head_dim] tensors for SDPA, L being
    the longest row's length; shorter rows read the zeroed null block and are masked out.
  * a prompt's first chunk (one row starting at position 0) attends only to its own new keys, so it returns
    them as they are with is_causal, exactly like generate()'s prefill.
One gather per layer per forward is the cost of paging on devices without a paged attention kernel; the slot
indices are computed once per forward, in begin, and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmlab.errors import ModelError
from llmlab.infer.engine.blocks import NULL_BLOCK
from llmlab.model.kv_cache import CacheStep


class KVPool:
    """Keys and values [n_layer, num_blocks * block_size, n_kv_head, head_dim] (slot-major)."""

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        shape = (cfg.n_layer, num_blocks * block_size, cfg.kv_heads, cfg.head_dim)
        # Empty, not zeros: only written slots and the null block are ever read.
        self.k = torch.empty(shape, device=p.device, dtype=dtype)
        self.v = torch.empty(shape, device=p.device, dtype=dtype)
        null = slice(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size)
        self.k[:, null] = 0
        self.v[:, null] = 0
        self.block_size, self.device = block_size, p.device

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg = model.config
        p = next(model.parameters())
        elem = p.element_size() if p.is_floating_point() else 4
        return 2 * cfg.n_layer * block_size * cfg.kv_heads * cfg.head_dim * elem


class PagedBatch:
    """One forward over T new tokens for each of B rows; row b continues its block table at starts[b]."""

    def __init__(self, pool: KVPool, tables: Sequence[Sequence[int]], starts: Sequence[int], T: int):
        self.pool, self.tables, self.starts, self.T = pool, tables, list(starts), T
        self.write = self.read = None

    def begin(self, B: int, T: int) -> CacheStep:
        if B != len(self.tables) or T != self.T:
            raise ModelError(f"a paged batch planned for {len(self.tables)} rows of {self.T} tokens got "
                             f"input [{B}, {T}]")
        device, bs = self.pool.device, self.pool.block_size
        starts = torch.tensor(self.starts, device=device)
        positions = starts[:, None] + torch.arange(T, device=device)  # [B, T]
        width = max(len(t) for t in self.tables)
        table = torch.tensor([list(t) + [NULL_BLOCK] * (width - len(t)) for t in self.tables], device=device)
        self.write = _slots(table, positions, bs).flatten()
        if B == 1 and self.starts[0] == 0:  # a prompt's first chunk: only its own keys, causal
            return CacheStep(T, 0, None, T, None, True, slice(0, T))
        lengths = [s + T for s in self.starts]
        L = max(lengths)
        keys = torch.arange(L, device=device)
        valid = keys < (starts + T)[:, None]  # [B, L]
        self.read = torch.where(valid, _slots(table, keys.expand(B, L), bs), 0).flatten()
        first = self.starts[0]
        same = all(s == first for s in self.starts)
        if same and T == 1:
            mask = None  # every row sees all of its L keys: no mask, as in KVCache's decode
        else:
            mask = (keys <= positions[:, :, None])[:, None]  # [B, 1, T, L]; also hides shorter rows' padding
        pos = slice(first, first + T) if same else positions
        return CacheStep(T, None, None, L, mask, False, pos)

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, n_kv_head, T, head_dim] into their slots; return each row's context keys/values."""
        B, KV, T, hd = k.shape
        kc, vc = self.pool.k[layer], self.pool.v[layer]
        kc.index_copy_(0, self.write, k.transpose(1, 2).reshape(B * T, KV, hd))
        vc.index_copy_(0, self.write, v.transpose(1, 2).reshape(B * T, KV, hd))
        if self.read is None:
            return k, v
        L = step.keylen
        return (kc.index_select(0, self.read).view(B, L, KV, hd).transpose(1, 2),
                vc.index_select(0, self.read).view(B, L, KV, hd).transpose(1, 2))

    def commit(self, step: CacheStep) -> None:
        """Nothing to advance: the engine moves each request's position itself."""


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot ids [B, N] of token positions [B, N] under block tables [B, width]."""
    return table.gather(1, positions // block_size) * block_size + positions % block_size
