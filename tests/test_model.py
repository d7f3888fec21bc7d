"""Transformer: causality, learning, NumPy parity, SDPA vs explicit attention, GQA, accounting, configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError, ModelError
from llmlab.model import ModelConfig, Transformer
from llmlab.model.numpy_ref import forward as numpy_forward
from llmlab.model.numpy_ref import numpy_weights

FLAVOURS = {
    "gpt2": dict(),
    "llama": dict(n_kv_head=2),  # grouped-query attention: 4 query heads share 2 key/value heads
}


def tiny(flavour: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(flavour, "tiny", **{**FLAVOURS[flavour], **overrides})).eval()


def tokens(B: int, T: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_changing_a_token_never_changes_earlier_logits(flavour):
    model = tiny(flavour)
    idx = tokens(2, 24)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 23):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 256
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-4  # the change is seen from t on


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tiny_model_overfits_one_batch(flavour):
    model = tiny(flavour).train()
    x = tokens(4, 33, seed=1)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(80):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(256), abs=0.3)  # starts near uniform over the vocabulary
    assert loss.item() < 0.05


@pytest.mark.parametrize("flavour,overrides", [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_head": 1}),
                                               ("llama", {"qkv_bias": True}),
                                               ("gpt2", {"tie_embeddings": False})])
def test_logits_match_numpy_reference(flavour, overrides):
    model = tiny(flavour, **overrides)
    with torch.no_grad():  # non-zero biases/gains so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    idx = tokens(2, 40)
    with torch.no_grad():
        logits = model(idx).numpy()
    ref = numpy_forward(numpy_weights(model), model.config, idx.numpy())
    assert logits.shape == ref.shape == (2, 40, 256)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sdpa_equals_explicit_softmax_attention(flavour):
    model = tiny(flavour)
    idx = tokens(3, 50)
    with torch.no_grad():
        fast = model(idx)
        model.attn_impl = "math"
        slow = model(idx)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="attn_impl"):
        model.attn_impl = "flash9"


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    """n_kv_head=2 with 4 query heads must equal plain MHA whose k/v heads are the shared ones, repeated."""
    gqa = tiny("llama", n_kv_head=2)
    mha = Transformer(ModelConfig.preset("llama", "tiny", n_kv_head=4)).eval()
    H, KV, hd = 4, 2, gqa.config.head_dim
    state = gqa.state_dict()
    for i in range(gqa.config.n_layer):
        key = f"blocks.{i}.attn.qkv.weight"
        q, k, v = state[key].split([H * hd, KV * hd, KV * hd])
        rep = lambda w: w.view(KV, hd, -1).repeat_interleave(H // KV, dim=0).reshape(H * hd, -1)  # noqa: E731
        state[key] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((H + 2 * KV) * hd, 64)
    idx = tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=0, atol=1e-5)


def test_param_count_and_flops_by_hand():
    model = tiny("gpt2")  # V=256, d=64, L=2, block 64, ff=256, biases, tied
    V, d, L, T, ff = 256, 64, 2, 64, 256
    per_layer = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    total = V * d + T * d + L * per_layer + 2 * d
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == total - V * d - T * d
    matmul_params = total - V * d - T * d + V * d  # the tied LM head still multiplies
    assert model.flops_per_token() == 6 * matmul_params + 12 * L * d * T
    assert model.flops_per_token(seq_len=10) == 6 * matmul_params + 12 * L * d * 10
    untied = tiny("llama")  # untied: the LM head is counted as its own parameter
    assert untied.num_params() - untied.num_params(non_embedding=True) == V * d


def test_presets_have_the_advertised_sizes():
    with torch.device("meta"):
        gpt2 = Transformer(ModelConfig.preset("gpt2", "gpt2-124M"))
        medium = Transformer(ModelConfig.preset("gpt2", "gpt2-350M"))
        llama = Transformer(ModelConfig.preset("llama", "gpt2-124M"))
    assert gpt2.num_params() == 124_439_808  # GPT-2 small, as published by OpenAI / HF
    assert medium.num_params() == 354_823_168
    assert llama.config.ffn_dim == 2048 and llama.config.kv_heads == 12 and not llama.config.tie_embeddings
    assert 1e5 < tiny("gpt2").num_params() < 1.5e5
    assert 2e6 < Transformer(ModelConfig.preset("gpt2", "mini")).num_params() < 1e7


def test_gpt2_init_scales_residual_projections():
    model = Transformer(ModelConfig.preset("gpt2", "mini"))
    L = model.config.n_layer
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[1].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert model.blocks[1].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0
    assert model.lm_head.weight is model.tok_emb.weight


def test_return_hidden_gives_final_normed_states():
    model = tiny("gpt2")
    idx = tokens(1, 8)
    with torch.no_grad():
        h = model(idx, return_hidden=True)
        assert h.shape == (1, 8, 64)
        torch.testing.assert_close(model.lm_head(h), model(idx))


def test_input_longer_than_block_size_is_refused():
    model = tiny("gpt2")
    with pytest.raises(ModelError, match=r"65 tokens.*block_size 64"):
        model(tokens(1, 65))


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=100, n_head=3), r"d_model=100 is not divisible by n_head=3"),
    (dict(n_head=4, n_kv_head=3), r"n_head=4 is not divisible by n_kv_head=3"),
    (dict(n_layer=0), r"n_layer=0 must be a positive integer"),
    (dict(vocab_size=-5), r"vocab_size=-5"),
    (dict(norm="batchnorm"), r"norm='batchnorm'.*layernorm, rmsnorm"),
    (dict(position="alibi"), r"position='alibi'.*learned, rope"),
    (dict(mlp="relu"), r"mlp='relu'"),
    (dict(dropout=1.0), r"dropout=1.0"),
    (dict(position="rope", d_model=36, n_head=4), r"even head_dim"),
])
def test_bad_config_names_the_key(kwargs, match):
    with pytest.raises(ModelError, match=match):
        Transformer(ModelConfig(**kwargs))


def test_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        ModelConfig.preset("lama", "tiny")
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        ModelConfig.preset("gpt2", "tinny")
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        ModelConfig.preset("gpt2", "tiny", n_layers=3)


def test_config_loads_from_toml_overrides(tmp_path):
    from llmlab.config import load_config

    cfg = load_config(ModelConfig, None, ["d_model=128", "mlp='swiglu'"])
    assert cfg.ffn_dim == 64 * math.ceil(8 * 128 / 3 / 64)  # the SwiGLU default follows the final d_model
    with pytest.raises(ConfigError, match="norm"):
        load_config(ModelConfig, None, ["norm='batchnorm'"])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fused_loss_equals_cross_entropy_of_the_logits(flavour, monkeypatch):
    import llmlab.model.loss as loss_module

    monkeypatch.setattr(loss_module, "_chunk_rows", lambda vocab, device: 7)  # several uneven chunks
    model = tiny(flavour).train()
    x, y = tokens(3, 20, seed=2), tokens(3, 20, seed=3)
    y[0, :5] = -100  # ignored positions (e.g. prompt tokens in SFT)
    plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    (2 * plain).backward()  # a scaled loss, as with gradient accumulation
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model.loss(x, y)
    (2 * fused).backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # no gradient wanted: just the value
        assert model.loss(x, y).item() == pytest.approx(plain.item(), abs=1e-6)


