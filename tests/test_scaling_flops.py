"""Parameter and FLOP accounting against hand-worked numbers, the model itself and published model sizes."""

from __future__ import annotations

import pytest

from llmlab.model import ModelConfig, Transformer
from llmlab.scaling.flops import (
    accounting,
    forward_flops,
    inference_flops_per_token,
    mean_inference_flops_per_token,
    param_counts,
    train_flops_per_token,
)


def test_gpt2_124m_matches_the_published_count():
    counts = param_counts(ModelConfig.preset("gpt2", "gpt2-124M"))
    assert counts["total"] == 124_439_808
    # Kaplan's N: 12 n_layer d^2 = 84,934,656 plus biases and norms.
    assert counts["kaplan"] == 12 * 12 * 768**2
    assert counts["non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize("cfg", [
    ModelConfig.preset("gpt2", "tiny"),
    ModelConfig.preset("llama", "tiny"),
    ModelConfig.preset("llama", "tiny", n_kv_head=2),
    ModelConfig.preset("gpt2", "tiny", bias=False, tie_embeddings=False),
    ModelConfig.preset("llama", "tiny", qkv_bias=True, d_ff=100),
], ids=["gpt2", "llama", "gqa", "gpt2-untied-nobias", "qwen-bias"])
def test_counts_match_the_model(cfg):
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert counts["non_embedding"] == model.num_params(non_embedding=True) - head
    # The model's own training estimate is 6N plus the attention term; ours splits them.
    attention = 12 * cfg.n_layer * cfg.d_model * cfg.block_size
    assert train_flops_per_token(cfg)["six_n"] + attention == model.flops_per_token()


def test_hand_worked_small_config():
    # vocab 10, 1 layer, d 4, 2 heads (head 2), ff 16, block 3, GELU, biases, LayerNorm, tied.
    cfg = ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=4, d_ff=16, block_size=3)
    # token 40 + position 12; layer: qkv 4*12+12, proj 16+4, fc 64+16, proj 64+4, 2 norms 16; final norm 8
    assert param_counts(cfg) == {"total": 40 + 12 + 60 + 20 + 80 + 68 + 16 + 8, "embedding": 52,
                                 "non_embedding": 252, "kaplan": 2 * 4 * 1 * (2 * 4 + 16)}
    f = forward_flops(cfg, seq_len=3)
    assert (f.embeddings, f.attention_qkv, f.attention_logits, f.attention_softmax) == (240, 288, 72, 54)
    assert (f.attention_values, f.attention_output, f.mlp, f.logits) == (72, 96, 768, 240)
    assert train_flops_per_token(cfg, 3) == {"six_n": 6.0 * (252 + 40), "chinchilla": 3.0 * 1830 / 3}
    # One new token at position 2 with a KV cache: 2 x (252 + 40) + 4 x 1 layer x 2 cached x 4.
    assert inference_flops_per_token(cfg, 2) == 2 * 292 + 32
    assert mean_inference_flops_per_token(cfg, 3) == pytest.approx(2 * 292 + 16 * 1.0)
    assert accounting(cfg)["inference_flops_per_token"]["last_position"] == 2 * 292 + 32


def chinchilla_model(d_model: int, n_layer: int, n_head: int, kv_size: int) -> ModelConfig:
    """A Chinchilla-paper shape (Hoffmann et al. 2022, Table A9 / Table 4): ffw 4 d, vocab 32,000, one
    embedding table, no learned positions."""
    return ModelConfig(vocab_size=32_000, n_layer=n_layer, n_head=n_head, d_model=n_head * kv_size,
                       d_ff=4 * d_model, position="rope", norm="rmsnorm", bias=False, tie_embeddings=True)


@pytest.mark.parametrize("published,d_model,n_layer,n_head,kv", [
    (44e6, 512, 8, 8, 64), (74e6, 640, 10, 10, 64), (106e6, 640, 16, 10, 64),
    (251e6, 1024, 16, 16, 64), (70e9, 8192, 80, 64, 128),  # the last is Chinchilla (Table 4)
])
def test_chinchilla_model_sizes(published, d_model, n_layer, n_head, kv):
    counts = param_counts(chinchilla_model(d_model, n_layer, n_head, kv))
    # The paper's Transformer-XL-style relative positions add one d x d projection per layer that llmlab's
    # layers lack; with it the count matches Table A9 closely, without it it is a few percent low.
    assert counts["total"] + n_layer * d_model**2 == pytest.approx(published, rel=0.015)
    assert 0.9 < counts["total"] / published < 1.0


def test_per_layer_flops_approach_six_n_as_models_widen():
    # At sequence 2048 the attention logits and values add 4 T d per layer against 6N's ~24 d^2, a share
    # T / (6 d) that fades with width; the one-hot embedding term adds a little more.
    ratios = []
    for d, layers, heads, kv in ((640, 10, 10, 64), (2048, 28, 16, 128), (8192, 80, 64, 128)):
        cfg = chinchilla_model(d, layers, heads, kv)
        flops = train_flops_per_token(cfg, 2048)
        ratios.append(flops["chinchilla"] / flops["six_n"])
        extra = 3 * layers * (4 * 2048 * d + 3 * heads * 2048) + 6 * 32_000 * d
        assert flops["chinchilla"] - flops["six_n"] == pytest.approx(extra, rel=0.05)
    assert ratios == sorted(ratios, reverse=True) and 1.0 < ratios[-1] < 1.1
