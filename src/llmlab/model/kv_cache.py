"""A static, preallocated key/value cache indexed by position (the gpt-fast layout).

Why: decoding one token at a time should cost one token's work. The cache keeps every layer's keys and
values for the positions seen so far, so a decode step only computes the new token's q/k/v and attends over
the stored ones. It is allocated once per generation (no per-step torch.cat) and written in place.

API (what generate, speculative decoding and a batching engine rely on)
-----------------------------------------------------------------------
    cache = KVCache.for_model(model, batch_size, max_len)   # max_len <= model.config.block_size
    cache.k, cache.v        # tensors [n_layer, batch, n_kv_head, max_len, head_dim], model dtype/device
    cache.pos               # list[int]: per row, how many positions are valid (= where the next write goes)

    logits = model(idx, cache=cache)    # idx [B, T]: row b's tokens are written at positions
                                        # pos[b] .. pos[b]+T-1, each attends to positions <= its own
                                        # (earlier cache entries + causal within idx); then pos[b] += T.
    cache.set_pos(p)        # int (all rows) or one int per row (list / 1-D tensor): roll back (or forward).
                            # Entries at positions >= p are ignored from then on and overwritten by the next
                            # writes -- nothing is erased, so rollback costs nothing.
    cache.rollback(n)       # pos -= n (int or per-row), e.g. to drop rejected speculative tokens
    cache.reset()           # pos = 0 for every row

Rows may sit at different positions (per-row `pos`): that is how batched prompts of different lengths work.
generate() right-pads the prompts, prefills them in one forward from position 0, then calls
`cache.set_pos(prompt_lengths)`, so each row's first new token overwrites its padding. Positions (learned
embedding index / RoPE angle) are the cache positions, so a row's result does not depend on its neighbours.

Speculative decoding with this API: after a draft proposes k tokens (k draft forwards of T=1, each advancing
the draft cache), the target scores [last_token, d1..dk] in one forward (T=k+1) and advances by k+1; when
row b accepts a_b tokens, call `target.set_pos(old_pos + a_b + 1)`-style per-row values (and the same for the
draft cache), then feed the corrected/bonus token next. Anything written beyond is overwritten later.

Cost notes: when every row is at the same position the write is one slice copy and the attention reads only
the first pos+T positions with no mask for T == 1 (decode) or is_causal for a prefill from 0; rows at
different positions use an index_put write and an explicit [B, 1, T, L] boolean mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmlab.errors import ModelError


class CacheStep:
    """What one forward pass over T new tokens needs: where to write, how many keys to read, which mask.

    positions: `slice` (all rows at `start`) or LongTensor [B, T] (per-row positions).
    mask: None, or a boolean tensor broadcastable to [B, n_head, T, keylen] (True = may attend).
    """

    __slots__ = ("T", "start", "index", "keylen", "mask", "is_causal", "positions")

    def __init__(self, T, start, index, keylen, mask, is_causal, positions):
        self.T, self.start, self.index, self.keylen = T, start, index, keylen
        self.mask, self.is_causal, self.positions = mask, is_causal, positions


class KVCache:
    """Per-layer keys/values [n_layer, B, n_kv_head, max_len, head_dim] and per-row lengths (module doc)."""

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        # Zeros, not empty: masked-out slots still enter the matmul, and 0 * NaN garbage would be NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len
        self.pos: list[int] = [0] * batch_size  # host-side ints: no device sync to decide shapes

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= cfg.block_size:
            raise ModelError(f"KV cache max_len={max_len} must be between 1 and the model's block_size "
                             f"{cfg.block_size}; shorten the prompt or the number of new tokens")
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                   device=p.device, dtype=p.dtype)

    # ----- position bookkeeping -----
    def set_pos(self, pos: int | Sequence[int] | torch.Tensor) -> None:
        if isinstance(pos, torch.Tensor):
            pos = pos.tolist()
        pos = [int(pos)] * self.batch_size if isinstance(pos, int) else [int(p) for p in pos]
        if len(pos) != self.batch_size or any(not 0 <= p <= self.max_len for p in pos):
            raise ModelError(f"KV cache positions {pos} must be {self.batch_size} values "
                             f"in [0, {self.max_len}]")
        self.pos = pos

    def rollback(self, n: int | Sequence[int] | torch.Tensor) -> None:
        if isinstance(n, torch.Tensor):
            n = n.tolist()
        n = [int(n)] * self.batch_size if isinstance(n, int) else n
        self.set_pos([p - int(m) for p, m in zip(self.pos, n, strict=True)])

    def reset(self) -> None:
        self.pos = [0] * self.batch_size

    # ----- used by Transformer.forward -----
    def begin(self, B: int, T: int) -> CacheStep:
        """Plan a forward over T new tokens per row (checks room; builds the mask once for all layers)."""
        if B != self.batch_size:
            raise ModelError(f"input batch {B} does not match the KV cache batch {self.batch_size}; "
                             "make a cache with KVCache.for_model(model, batch_size)")
        end = max(self.pos) + T
        if end > self.max_len:
            raise ModelError(f"{T} new tokens at position {max(self.pos)} exceed the KV cache length "
                             f"{self.max_len}; make a longer cache (at most block_size) or shorten the input")
        device = self.k.device
        first = self.pos[0]
        if all(p == first for p in self.pos):
            if T == 1 or first > 0:
                # Decode: the new token sees every stored position; no mask needed.
                # Continuing at first > 0 with T > 1 (chunked prefill, speculative verify): causal, offset.
                mask = None if T == 1 else _offset_causal(first, T, end, device)
                return CacheStep(T, first, None, end, mask, False, slice(first, first + T))
            return CacheStep(T, 0, None, T, None, True, slice(0, T))
        start = torch.tensor(self.pos, device=device)
        positions = start[:, None] + torch.arange(T, device=device)  # [B, T]
        mask = torch.arange(end, device=device) <= positions[:, :, None]  # [B, T, L]
        return CacheStep(T, None, positions, end, mask[:, None], False, positions)

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        """Write this layer's new k, v [B, n_kv_head, T, head_dim]; return the valid keys and values."""
        kc, vc = self.k[layer], self.v[layer]
        if step.index is None:
            kc[:, :, step.start:step.start + step.T] = k
            vc[:, :, step.start:step.start + step.T] = v
        else:
            rows = torch.arange(self.batch_size, device=kc.device)[:, None]
            kc[rows, :, step.index] = k.transpose(1, 2)
            vc[rows, :, step.index] = v.transpose(1, 2)
        return kc[:, :, :step.keylen], vc[:, :, :step.keylen]

    def commit(self, step: CacheStep) -> None:
        self.pos = [p + step.T for p in self.pos]


def _offset_causal(start: int, T: int, end: int, device) -> torch.Tensor:
    """[T, end] boolean mask: query i (at position start+i) may attend key j iff j <= start+i."""
    return torch.arange(end, device=device) <= torch.arange(start, start + T, device=device)[:, None]
