"""A plain NumPy forward pass of llmlab's Transformer, for checking the torch model against.

It shares nothing with transformer.py but the parameter names: every step (embeddings, LayerNorm/RMSNorm,
RoPE, causal grouped-query attention, GELU/SwiGLU, the LM head) is written out from the papers' formulas,
in float64 by default so the reference is more precise than the model it checks.

    from llmlab.model.numpy_ref import numpy_weights, forward
    logits = forward(numpy_weights(model), model.config, idx)     # idx int array [B, T] -> [B, T, vocab]
"""

from __future__ import annotations

import math

import numpy as np

from llmlab.model.config import ModelConfig


def numpy_weights(model) -> dict[str, np.ndarray]:
    """The model's parameters as float64 NumPy arrays (the tied LM head included under its own name)."""
    state = {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as in Ba et al. 2016
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # Zhang & Sennrich 2019


def gelu_tanh(x):
    # Hendrycks & Gimpel 2016, tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, W, b=None):
    y = x @ W.T
    return y if b is None else y + b


def llama3_scale(inv_freq, scaling: dict):
    """Llama 3.1's frequency adjustment (Meta, "The Llama 3 Herd of Models", 2024), written case by case:
    wavelengths above L/low_freq_factor are slowed by `factor`, those below L/high_freq_factor kept, and
    those in between blended with smooth = (L/wavelength - low) / (high - low),
    L = original_max_position_embeddings."""
    L, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = np.empty_like(inv_freq)
    for i, f in enumerate(inv_freq):
        wavelen = 2 * math.pi / f
        if wavelen < L / high:
            out[i] = f
        elif wavelen > L / low:
            out[i] = f / factor
        else:
            smooth = (L / wavelen - low) / (high - low)
            out[i] = (1 - smooth) * f / factor + smooth * f
    return out


def rope(x, theta, scaling: dict | None = None):
    """Rotate pairs (i, i + d/2) of each head by angle pos * theta^(-2i/d) (HF Llama layout), the frequencies
    adjusted by llama3 `scaling` when given. x [B, H, T, d]."""
    T, d = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2) / d)
    if scaling is not None:
        inv_freq = llama3_scale(inv_freq, scaling)
    ang = np.arange(T)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(x, W: dict, prefix: str, cfg: ModelConfig):
    """Causal multi-head (or grouped-query) self-attention of x [B, T, d_model]."""
    B, T, _ = x.shape
    H, KV, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
    qkv = linear(x, W[prefix + "qkv.weight"], W.get(prefix + "qkv.bias"))
    q, k, v = np.split(qkv, [H * hd, (H + KV) * hd], axis=-1)
    q = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    k = k.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    if cfg.position == "rope":
        q, k = rope(q, cfg.rope_theta, cfg.rope_scaling), rope(k, cfg.rope_theta, cfg.rope_scaling)
    group = H // KV  # query head h uses key/value head h // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # [B, H, T, T]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    y = softmax(scores) @ v  # [B, H, T, hd]
    y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return linear(y, W[prefix + "proj.weight"], W.get(prefix + "proj.bias"))


def mlp(x, W: dict, prefix: str, cfg: ModelConfig):
    h = linear(x, W[prefix + "fc.weight"], W.get(prefix + "fc.bias"))
    if cfg.mlp == "swiglu":
        gate, up = np.split(h, 2, axis=-1)
        h = silu(gate) * up  # Shazeer 2020
    else:
        h = gelu_tanh(h)
    return linear(h, W[prefix + "proj.weight"], W.get(prefix + "proj.bias"))


def norm(x, W: dict, prefix: str, cfg: ModelConfig):
    if cfg.norm == "rmsnorm":
        return rms_norm(x, W[prefix + "weight"], cfg.norm_eps)
    return layer_norm(x, W[prefix + "weight"], W.get(prefix + "bias"), cfg.norm_eps)


def forward(W: dict[str, np.ndarray], cfg: ModelConfig, idx, dtype=np.float64) -> np.ndarray:
    """Logits [B, T, vocab] for token ids idx [B, T]."""
    W = {k: v.astype(dtype) for k, v in W.items()}
    idx = np.asarray(idx)
    x = W["tok_emb.weight"][idx]
    if cfg.position == "learned":
        x = x + W["pos_emb.weight"][: idx.shape[1]]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        x = x + attention(norm(x, W, p + "attn_norm.", cfg), W, p + "attn.", cfg)
        x = x + mlp(norm(x, W, p + "mlp_norm.", cfg), W, p + "mlp.", cfg)
    return linear(norm(x, W, "norm.", cfg), W["lm_head.weight"])
