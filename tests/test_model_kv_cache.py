"""The static KV cache: chunked and one-token steps equal the full forward; per-row positions; rollback."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import ModelError
from llmlab.model import KVCache, ModelConfig, Transformer

FLAVOURS = {"gpt2": dict(), "llama": dict(n_kv_head=2)}


def tiny(flavour: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(flavour, "tiny", **FLAVOURS[flavour])).eval()


def tokens(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_prefill_chunks_and_single_steps_equal_full_forward(flavour, impl):
    model = tiny(flavour)
    model.attn_impl = impl
    idx = tokens(2, 40)
    cache = KVCache.for_model(model, 2, 48)
    with torch.inference_mode():
        full = model(idx)
        parts = [model(idx[:, :16], cache=cache)]  # prefill from 0 (is_causal)
        parts += [model(idx[:, t:t + 1], cache=cache) for t in range(16, 24)]  # decode steps
        parts.append(model(idx[:, 24:40], cache=cache))  # continue with T > 1 (offset causal mask)
    assert cache.pos == [40, 40]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rows_at_different_positions_match_each_row_alone(flavour):
    model = tiny(flavour)
    lengths = [5, 12, 1]
    rows = [tokens(1, 20, seed=s)[0] for s in range(3)]
    cache = KVCache.for_model(model, 3, 32)
    with torch.inference_mode():
        pairs = list(zip(rows, lengths, strict=True))
        padded = torch.stack([torch.cat([r[:n], torch.zeros(12 - n, dtype=torch.long)]) for r, n in pairs])
        model(padded, cache=cache)
        cache.set_pos(lengths)  # the padding will be overwritten
        nxt = torch.stack([r[n:n + 3] for r, n in pairs])
        out = model(nxt, cache=cache)  # three tokens per row, each row at its own position
        assert cache.pos == [8, 15, 4]
        for b, n in enumerate(lengths):
            alone = model(rows[b][None, :n + 3])[0, n:]
            torch.testing.assert_close(out[b], alone, rtol=0, atol=2e-5)


def test_rollback_then_overwrite_equals_a_fresh_run():
    """What speculative decoding does: write rejected guesses, roll back, write the real tokens."""
    model = tiny("llama")
    idx = tokens(1, 20)
    cache = KVCache.for_model(model, 1, 20)
    with torch.inference_mode():
        model(idx[:, :10], cache=cache)
        model(tokens(1, 5, seed=9), cache=cache)  # wrong guesses at positions 10..14
        cache.rollback(5)
        assert cache.pos == [10]
        out = model(idx[:, 10:20], cache=cache)
        torch.testing.assert_close(out, model(idx)[:, 10:], rtol=0, atol=2e-5)
    cache.set_pos([3])
    assert cache.pos == [3]
    cache.reset()
    assert cache.pos == [0]


def test_cache_layout_and_limits():
    model = tiny("llama")
    cache = KVCache.for_model(model, 2, 16)
    assert cache.k.shape == (2, 2, 2, 16, 16)  # [n_layer, batch, n_kv_head, max_len, head_dim]
    with pytest.raises(ModelError, match="exceed the KV cache length 16"):
        model(tokens(2, 17), cache=cache)
    with pytest.raises(ModelError, match="batch 1 does not match the KV cache batch 2"):
        model(tokens(1, 2), cache=cache)
    with pytest.raises(ModelError, match=r"between 1 and the model's block_size 64"):
        KVCache.for_model(model, 1, 65)
    with pytest.raises(ModelError, match=r"must be 2 values in \[0, 16\]"):
        cache.set_pos([3, 17])
    assert cache.pos == [0, 0]  # a refused call changes nothing
