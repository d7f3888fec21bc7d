"""Parameter and FLOP accounting for any ModelConfig, computed from the shape alone (no model is built).

    llmlab scaling flops --config cpu-demo            # params, training FLOPs/token, inference FLOPs/token

Parameters (`param_counts`): `total` is what Transformer.num_params() reports (tied tables once);
`embedding` is the token table, the learned position table and an untied LM head; `non_embedding` is the
rest, Kaplan et al. (2020)'s N, which they found gives cleaner power laws than the total. `kaplan` is their
approximation 2 * d_model * n_layer * (2 * d_attn + d_ff) (12 * n_layer * d_model^2 for a GPT block), which
ignores biases and norms.

Training FLOPs per token, two ways:
  - `six_n`: 6N with N the parameters that take part in a matmul (non-embedding plus the LM head, which is
    compute even when tied): 2 FLOPs per multiply-add, forward once and backward twice (activations and
    weights). C = 6ND is the approximation Kaplan and Chinchilla size runs by.
  - `chinchilla`: the per-layer count of Hoffmann et al. (2022), appendix F, divided by the sequence length:
    embeddings (2 * V * d, their one-hot matmul convention), per layer the Q/K/V projections, the QK^T
    logits, the softmax (3 * heads * T), the attention-weighted values, the output projection and the MLP,
    then the final logits; backward = 2 x forward, so training = 3 x forward. Grouped-query attention
    shrinks the K and V projections; SwiGLU has three d x ff matrices instead of two.

Inference FLOPs per token with a KV cache: the new token's forward only (2 FLOPs per matmul parameter, the
LM head included) plus reading `context` cached keys and values per layer (2 * 2 * context * d_attn).
`inference_flops_per_token(cfg, context)` is that at one position; `mean_inference_flops_per_token`
averages it over positions 1..context, the cost per generated token of filling a whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.model import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)  # gain (and LayerNorm's bias)


def _layer_params(cfg: ModelConfig) -> int:
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * hd
    attn = d * qkv_out + (qkv_out if cfg.attn_bias else 0) + cfg.n_head * hd * d + (d if cfg.bias else 0)
    fc_out = ff * (2 if cfg.mlp == "swiglu" else 1)
    mlp = d * fc_out + ff * d + ((fc_out + d) if cfg.bias else 0)
    return attn + mlp + 2 * _norm_params(cfg)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "embedding", "non_embedding", "kaplan"} for `cfg` (see the module docstring)."""
    token = cfg.vocab_size * cfg.d_model
    position = cfg.block_size * cfg.d_model if cfg.position == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    body = cfg.n_layer * _layer_params(cfg) + _norm_params(cfg)
    d_attn = cfg.n_head * cfg.head_dim
    kaplan = 2 * cfg.d_model * cfg.n_layer * (2 * d_attn + cfg.ffn_dim)
    return {"total": token + position + head + body, "embedding": token + position + head,
            "non_embedding": body, "kaplan": kaplan}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul for every token: non-embedding plus the LM head (tied or not)."""
    return param_counts(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model


@dataclass
class ForwardFlops:
    """Chinchilla appendix F forward-pass FLOPs for one sequence of `seq_len` tokens, term by term."""

    seq_len: int
    embeddings: int
    attention_qkv: int
    attention_logits: int
    attention_softmax: int
    attention_values: int
    attention_output: int
    mlp: int
    logits: int

    @property
    def total(self) -> int:
        return (self.embeddings + self.attention_qkv + self.attention_logits + self.attention_softmax
                + self.attention_values + self.attention_output + self.mlp + self.logits)


def forward_flops(cfg: ModelConfig, seq_len: int | None = None) -> ForwardFlops:
    """Appendix F's forward count for a sequence (default: block_size), every layer summed."""
    T = cfg.block_size if seq_len is None else seq_len
    d, L, hd, V = cfg.d_model, cfg.n_layer, cfg.head_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.n_head * hd, cfg.kv_heads * hd
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    return ForwardFlops(
        seq_len=T,
        embeddings=2 * T * V * d,
        attention_qkv=L * 2 * T * d * (q_dim + 2 * kv_dim),
        attention_logits=L * 2 * T * T * q_dim,
        attention_softmax=L * 3 * cfg.n_head * T * T,
        attention_values=L * 2 * T * T * q_dim,
        attention_output=L * 2 * T * q_dim * d,
        mlp=L * 2 * T * mlp_mats * d * cfg.ffn_dim,
        logits=2 * T * d * V,
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """{"six_n": 6N, "chinchilla": 3 x appendix-F forward / seq_len} training FLOPs per token."""
    fwd = forward_flops(cfg, seq_len)
    return {"six_n": 6.0 * matmul_params(cfg), "chinchilla": 3.0 * fwd.total / fwd.seq_len}


def inference_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs for one new token at position `context` with a KV cache (keys/values of `context`
    earlier tokens are read, not recomputed)."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.n_layer * context * cfg.n_head * cfg.head_dim


def mean_inference_flops_per_token(cfg: ModelConfig, context: int | None = None) -> float:
    """inference_flops_per_token averaged over contexts 0..context-1 (generating a whole context)."""
    context = cfg.block_size if context is None else context
    per_position = 4.0 * cfg.n_layer * cfg.n_head * cfg.head_dim
    return inference_flops_per_token(cfg, 0) + per_position * (context - 1) / 2


def accounting(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Everything `llmlab scaling flops` prints: params, training FLOPs/token both ways (and the terms of
    the per-layer count), inference FLOPs/token with a KV cache at the last position and on average."""
    T = cfg.block_size if seq_len is None else seq_len
    fwd = forward_flops(cfg, T)
    terms = {k: v / T for k, v in vars(fwd).items() if k != "seq_len"}
    return {"params": param_counts(cfg), "seq_len": T, "train_flops_per_token": train_flops_per_token(cfg, T),
            "forward_flops_per_token_terms": terms,
            "inference_flops_per_token": {"last_position": inference_flops_per_token(cfg, T - 1),
                                          "mean_over_context": mean_inference_flops_per_token(cfg, T)}}
