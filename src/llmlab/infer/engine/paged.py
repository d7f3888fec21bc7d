"""Paged keys/values: the pool's tensors, and a per-forward cache object the model uses like a KVCache.

The model calls cache.begin(B, T) once per forward, cache.update(layer, step, k, v) in every attention layer
and cache.commit(step) at the end (llmlab.model.kv_cache documents the contract). PagedBatch implements the
same three calls over block tables, so the model never learns that memory is paged:
  * update writes the new keys/values into their slots (slot = block * block_size + offset), then returns
    each row's whole context gathered block by block into [B, n_kv_head, L, head_dim] tensors for SDPA, L
    being the longest row's length; shorter rows' tails (the null block, or slots not written yet) are masked
    out. The pool starts zeroed, so a masked slot is always finite (0 * NaN would poison the sum).
  * a prompt's first chunk (one row starting at position 0) attends only to its own new keys, so it returns
    them as they are with is_causal, exactly like generate()'s prefill.
One gather per layer per forward is the cost of paging on devices without a paged attention kernel. It copies
whole blocks (one contiguous run of block_size * n_kv_head * head_dim values each) into scratch buffers that
are reused from layer to layer and step to step (a fresh multi-megabyte tensor per layer costs page faults
on CPU); the indices are computed once per forward, in begin, and shared by every layer.

Decode steps avoid that gather (DecodeSlots): every decoding request owns a row ("slot") of a contiguous
copy of its keys/values, filled from its blocks once when it starts decoding and then grown by one token per
step, written to the pool and the slot alike. Slots are kept dense (a leaving request's row is filled by the
last one), so a step over B decoding rows reads rows 0..B-1 in place, as a static KVCache is read. The pool
stays the source of truth (prefix caching, prefills, reloads). The slots have a byte budget of their own,
carved out of the engine's keys/values budget (engine.split_kv_budget), and are not used when a step would
need more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmlab.errors import ModelError
from llmlab.infer.engine.blocks import NULL_BLOCK
from llmlab.model.kv_cache import CacheStep


class KVPool:
    """Keys and values [n_layer, num_blocks, block_size, n_kv_head, head_dim], and the gather buffers."""

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        shape = (cfg.n_layer, num_blocks, block_size, cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=p.device, dtype=dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=dtype)
        self.block_size, self.device = block_size, p.device
        self._scratch = (self.k.new_empty(0), self.v.new_empty(0))

    def scratch(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers [blocks, block_size, n_kv_head, head_dim] for gathered keys and values."""
        n = blocks * self.k[0, 0].numel()
        if self._scratch[0].numel() < n:
            self._scratch = (self.k.new_empty(n), self.v.new_empty(n))
        shape = (blocks, *self.k.shape[2:])
        return self._scratch[0][:n].view(shape), self._scratch[1][:n].view(shape)

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg = model.config
        p = next(model.parameters())
        elem = p.element_size() if p.is_floating_point() else 4
        return 2 * cfg.n_layer * block_size * cfg.kv_heads * cfg.head_dim * elem


class PagedBatch:
    """One forward over B rows of T input positions: row b continues its block table at starts[b] with
    lengths[b] <= T real tokens (default T). A shorter row's padding repeats its last position, writes to the
    null block and attends like its last token; the caller ignores its outputs. A row with discard[b] writes
    all its keys/values to the null block (a static batch's padding row)."""

    def __init__(self, pool: KVPool, tables: Sequence[Sequence[int]], starts: Sequence[int], T: int,
                 lengths: Sequence[int] | None = None, discard: Sequence[bool] | None = None):
        self.pool, self.tables, self.starts, self.T = pool, tables, list(starts), T
        self.lengths = [T] * len(tables) if lengths is None else list(lengths)
        self.discard = [False] * len(tables) if discard is None else list(discard)
        self.write = self.read = None

    def begin(self, B: int, T: int) -> CacheStep:
        if B != len(self.tables) or T != self.T:
            raise ModelError(f"a paged batch planned for {len(self.tables)} rows of {self.T} tokens got "
                             f"input [{B}, {T}]")
        device, bs = self.pool.device, self.pool.block_size
        starts = torch.tensor(self.starts, device=device)
        lengths = torch.tensor(self.lengths, device=device)[:, None]
        offsets = torch.arange(T, device=device)
        positions = starts[:, None] + torch.minimum(offsets, lengths - 1)  # [B, T]
        width = max(len(t) for t in self.tables)
        table = torch.tensor([list(t) + [NULL_BLOCK] * (width - len(t)) for t in self.tables], device=device)
        slots = table.gather(1, positions // bs) * bs + positions % bs
        kept = (offsets < lengths) & ~torch.tensor(self.discard, device=device)[:, None]
        self.write = torch.where(kept, slots, NULL_BLOCK * bs).flatten()
        if B == 1 and self.starts[0] == 0 and self.lengths[0] == T:  # a prompt's first chunk: causal
            return CacheStep(T, 0, None, T, None, True, slice(0, T))
        L = max(s + n for s, n in zip(self.starts, self.lengths, strict=True))
        self.read = table[:, :-(-L // bs)].flatten()  # whole blocks; the tail beyond L is sliced off
        keys = torch.arange(L, device=device)
        first = self.starts[0]
        same = all(s == first for s in self.starts) and all(n == T for n in self.lengths)
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
        kc.view(-1, KV, hd).index_copy_(0, self.write, k.transpose(1, 2).reshape(B * T, KV, hd))
        vc.view(-1, KV, hd).index_copy_(0, self.write, v.transpose(1, 2).reshape(B * T, KV, hd))
        if self.read is None:
            return k, v
        kg, vg = self.pool.scratch(self.read.numel())
        torch.index_select(kc, 0, self.read, out=kg)
        torch.index_select(vc, 0, self.read, out=vg)
        L = step.keylen
        return (kg.view(B, -1, KV, hd)[:, :L].transpose(1, 2),
                vg.view(B, -1, KV, hd)[:, :L].transpose(1, 2))

    def commit(self, step: CacheStep) -> None:
        """Nothing to advance: the engine moves each request's position itself."""



class DecodeSlots:
    """Contiguous keys/values [n_layer, rows, n_kv_head, width, head_dim] of the decoding requests, row i
    holding the request in slot i (module docstring). They grow on demand, rows up to max_rows and width
    (rounded up to whole blocks) up to the model's context, and never take more than budget_bytes: reserve()
    says False instead, and the engine gathers from the pool. (Growing copies the held rows over, so the old
    and the new tensors coexist for that moment.)"""

    def __init__(self, pool: KVPool, max_rows: int, context: int, budget_bytes: int):
        self.pool, self.max_rows, self.context, self.budget = pool, max_rows, context, budget_bytes
        n_layer, _, _, kv, hd = pool.k.shape
        self.bytes_per_row_position = 2 * n_layer * kv * hd * pool.k.element_size()
        self.k = self.v = None
        self.rows = self.width = 0

    def reserve(self, rows: int, width: int) -> bool:
        """Room for `rows` slots of `width` positions, copying what is held when growing; False if the
        budget does not allow it. Rows grow geometrically (requests join a few at a time), width to the
        longest request's whole blocks."""
        if rows <= self.rows and width <= self.width:
            return True
        bs = self.pool.block_size
        width = min(self.context, max(self.width, -(-width // bs) * bs))
        fits = [n for n in (min(self.max_rows, max(rows, 2 * self.rows)), rows)
                if n * width * self.bytes_per_row_position <= self.budget]
        if not fits:
            return False
        rows = fits[0]
        n_layer, _, _, kv, hd = self.pool.k.shape
        # Zeros: masked positions still enter SDPA's matmul, and 0 * NaN would poison the sum.
        k = self.pool.k.new_zeros(n_layer, rows, kv, width, hd)
        v = torch.zeros_like(k)
        if self.k is not None:
            k[:, :self.rows, :, :self.width] = self.k
            v[:, :self.rows, :, :self.width] = self.v
        self.k, self.v, self.rows, self.width = k, v, rows, width
        return True

    def load(self, slot: int, table: Sequence[int], length: int) -> None:
        """Copy a request's first `length` positions from its blocks into its slot, all layers at once."""
        bs = self.pool.block_size
        blocks = torch.tensor(table[:-(-length // bs)], device=self.pool.device)
        for src, dst in ((self.pool.k, self.k), (self.pool.v, self.v)):
            n_layer, _, _, kv, hd = src.shape
            rows = src.index_select(1, blocks).view(n_layer, -1, kv, hd)[:, :length]
            dst[:, slot, :, :length] = rows.transpose(1, 2)

    def move(self, src: int, dst: int) -> None:
        """Slot src's contents into slot dst (a leaving request's row is refilled by the last one)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class SlotBatch:
    """One decode forward (T=1) over slots 0..B-1: row b writes its new key/value at position starts[b] of
    its slot and of its block table's pool slot (the null block's with discard[b]: a static batch's padding
    row), and attends to its slot's first starts[b] + 1 positions."""

    def __init__(self, slots: DecodeSlots, tables: Sequence[Sequence[int]], starts: Sequence[int],
                 discard: Sequence[bool] | None = None):
        self.slots, self.tables, self.starts = slots, tables, list(starts)
        self.discard = [False] * len(tables) if discard is None else list(discard)
        self.write = self.rows = self.positions = None

    def begin(self, B: int, T: int) -> CacheStep:
        if B != len(self.tables) or T != 1:
            raise ModelError(f"a decode batch planned for {len(self.tables)} rows of 1 token got input "
                             f"[{B}, {T}]")
        device, bs = self.slots.pool.device, self.slots.pool.block_size
        self.write = torch.tensor([NULL_BLOCK * bs if d else t[s // bs] * bs + s % bs
                                   for t, s, d in zip(self.tables, self.starts, self.discard, strict=True)],
                                  device=device)
        self.positions = torch.tensor(self.starts, device=device)
        _, _, kv, width, _ = self.slots.k.shape
        heads = torch.arange(B * kv, device=device).view(B, kv)
        self.rows = (heads * width + self.positions[:, None]).flatten()  # (row, head, position) flattened
        L = max(self.starts) + 1
        first = self.starts[0]
        if all(s == first for s in self.starts):
            return CacheStep(1, first, None, L, None, False, slice(first, first + 1))
        mask = (torch.arange(L, device=device) <= self.positions[:, None])[:, None, None]  # [B, 1, 1, L]
        return CacheStep(1, None, None, L, mask, False, self.positions[:, None])

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, n_kv_head, 1, head_dim] to the pool and the slots; return the slots' rows 0..B-1."""
        B, KV, _, hd = k.shape
        pool, slots = self.slots.pool, self.slots
        for new, paged, rows in ((k, pool.k[layer], slots.k[layer]), (v, pool.v[layer], slots.v[layer])):
            paged.view(-1, KV, hd).index_copy_(0, self.write, new[:, :, 0])
            rows.view(-1, hd).index_copy_(0, self.rows, new[:, :, 0].reshape(B * KV, hd))
        return slots.k[layer, :B, :, :step.keylen], slots.v[layer, :B, :, :step.keylen]

    def commit(self, step: CacheStep) -> None:
        """Nothing to advance: the engine moves each request's position itself."""
