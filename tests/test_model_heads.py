"""Model outputs for post-training: per-token log-probabilities (chunked, against log_softmax of the logits),
summed losses, packed rows (segment_ids: each example as if alone), and the scalar head (scores, save/load,
no HF export)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import llmlab.model.loss as loss_module
from llmlab.errors import ModelError
from llmlab.model import ModelConfig, Transformer

V, T = 96, 16


def model_of(flavour: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(flavour, "tiny", vocab_size=V, d_model=32, n_head=2, block_size=T, **overrides)
    return Transformer(cfg)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows, so the chunked head runs several chunks and a ragged last one."""
    monkeypatch.setattr(loss_module, "_chunk_rows", lambda vocab, device: 5)


def batch(rows: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (rows, T), generator=g)
    y = torch.randint(V, (rows, T), generator=g)
    y[0, :4] = -100  # ignored targets
    return x, y


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_token_logprobs_equal_log_softmax_of_the_logits(flavour, small_chunks):
    x, y = batch()
    kept = y != -100
    model = model_of(flavour)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))  # a DPO-like mix of tokens

    ref = F.log_softmax(model(x).float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * kept
    (ref * weights).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got = model.token_logprobs(x, y)
    assert got.dtype == torch.float32 and got.shape == (3, T)
    torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-5)
    assert (got[0, :4] == 0).all()
    (got * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_token_logprobs_under_bf16_autocast_backpropagate(small_chunks):
    x, y = batch()
    model = model_of("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.token_logprobs(x, y)
        ref = F.log_softmax(model(x).float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref * (y != -100), rtol=0, atol=2e-2)
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_summed_loss_equals_cross_entropy_sum(flavour, small_chunks):
    x, y = batch()
    model = model_of(flavour)
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    got = model(x, targets=y, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got.backward()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_packed_row_equals_each_example_alone(flavour):
    model = model_of(flavour).eval()
    lengths = [5, 7, 4]
    g = torch.Generator().manual_seed(3)
    examples = [torch.randint(V, (1, n), generator=g) for n in lengths]
    packed = torch.cat(examples, dim=1)
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    # a second row packs the same examples in another order, with other segment ids
    order = [2, 0, 1]
    packed2 = torch.cat([examples[i] for i in order], dim=1)
    segments2 = torch.cat([torch.full((1, lengths[i]), 10 + j) for j, i in enumerate(order)], dim=1)
    logits = model(torch.cat([packed, packed2]), segment_ids=torch.cat([segments, segments2]))
    alone = [model(e)[0] for e in examples]
    torch.testing.assert_close(logits[0], torch.cat(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], torch.cat([alone[i] for i in order]), rtol=0, atol=1e-5)
    targets = torch.roll(packed, -1, dims=1)
    lp = model.token_logprobs(packed, targets, segment_ids=segments)
    ref = F.log_softmax(logits[:1], -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_scalar_head_scores_save_load_and_refuse_lm_outputs(tmp_path):
    model = model_of("llama", head="scalar")
    assert not hasattr(model, "lm_head") and model.score.weight.shape == (1, 32)
    x, _ = batch(2)
    scores = model.scores(x)
    assert scores.shape == (2, T) and scores.dtype == torch.float32
    torch.testing.assert_close(model(x), scores)
    torch.testing.assert_close(model.score(model.hidden(x)).squeeze(-1), scores)
    model.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["head"] == "scalar"
    loaded = Transformer.load(tmp_path / "rm")
    assert loaded.config.head == "scalar"
    torch.testing.assert_close(loaded.scores(x), scores)
    with pytest.raises(ModelError, match="head='lm'"):
        model(x, targets=x)
    with pytest.raises(ModelError, match="head='scalar'"):
        model_of("gpt2").scores(x)


def test_scalar_head_of_a_tied_config_counts_no_lm_head():
    lm, rm = model_of("gpt2"), model_of("gpt2", head="scalar")
    assert rm.num_params() == lm.num_params() + 32  # the tied LM head adds no tensor; the score adds d_model
    assert rm.flops_per_token() == lm.flops_per_token() - 6 * V * 32 + 6 * 32
