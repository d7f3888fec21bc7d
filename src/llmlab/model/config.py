"""ModelConfig: every number that decides a Transformer's shape, plus the named presets.

One dataclass describes both flavours the codebase speaks:
  gpt2  -- learned positions, LayerNorm, GELU(tanh) MLP, biases, tied input/output embeddings
           (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners");
  llama -- rotary positions, RMSNorm, SwiGLU MLP, no biases, untied embeddings, grouped-query attention
           (Touvron et al. 2023; Su et al. 2021 "RoFormer"; Shazeer 2020 "GLU Variants";
           Ainslie et al. 2023 "GQA").

`d_ff` and `n_kv_head` may be left as None; the resolved values are the properties `ffn_dim`
(4*d_model for GELU, 8/3*d_model rounded up to a multiple of 64 for SwiGLU, which keeps the MLP's
parameter count equal to GELU's) and `kv_heads` (= n_head). Keeping the fields as written means an override
of d_model later still gets the matching default d_ff.

`qkv_bias` (None = follow `bias`) exists because Qwen2-style checkpoints put biases on the q/k/v projection
only; it is not part of either preset.

`rope_scaling` (None = plain RoPE) holds Llama 3.1/3.2's frequency adjustment as the dict Hugging Face stores
under that name: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"} (Meta, "The Llama 3 Herd of Models", 2024; transformer.rope_inv_freq
applies it). It is a plain dict so config.json and TOML round-trip it unchanged.

`head` says what the last layer computes: "lm" (next-token logits over the vocabulary, the default) or
"scalar" (one number per position from a Linear(d_model, 1) named `score`, for reward and value models; the
LM head is absent and tie_embeddings has no effect). config.json records it, so Transformer.load rebuilds
either kind.

`validate()` raises ModelError naming the key and the fix; Transformer() calls it, so configs built field by
field (TOML + key=value overrides) are checked once, when they are complete.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from llmlab.errors import ConfigError, ModelError


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (plain multi-head attention)
    d_model: int = 256
    d_ff: int | None = None  # None -> flavour default, see ffn_dim
    block_size: int = 256  # longest sequence the model accepts (learned positions / RoPE table)
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    qkv_bias: bool | None = None  # None -> bias; True with bias=False is the Qwen2 layout
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else {"rope_type": "llama3", ...} (above)
    head: Literal["lm", "scalar"] = "lm"  # lm: next-token logits; scalar: one score per position (above)

    # ----- resolved values -----
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            # Three d x ff matrices instead of two: 8/3 * d keeps the parameter count of a 4*d GELU MLP.
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def attn_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    # ----- checks -----
    def validate(self) -> ModelConfig:
        """Raise ModelError for a config no Transformer can be built from; return self."""
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "block_size"):
            _positive(key, getattr(self, key))
        for key in ("n_kv_head", "d_ff"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        _choice("position", self.position, ("learned", "rope"))
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("mlp", self.mlp, ("gelu", "swiglu"))
        _choice("head", self.head, ("lm", "scalar"))
        if self.d_model % self.n_head:
            raise ModelError(f"model config: d_model={self.d_model} is not divisible by "
                             f"n_head={self.n_head}; choose n_head among {_divisors(self.d_model)}")
        if self.n_head % self.kv_heads:
            raise ModelError(f"model config: n_head={self.n_head} is not divisible by "
                             f"n_kv_head={self.kv_heads}; choose n_kv_head among {_divisors(self.n_head)}")
        if self.position == "rope" and self.head_dim % 2:
            raise ModelError(f"model config: rope needs an even head_dim, got "
                             f"d_model/n_head={self.head_dim}; change d_model or n_head")
        if self.position == "rope" and not self.rope_theta > 0:
            raise ModelError(f"model config: rope_theta={self.rope_theta} must be > 0 "
                             "(Llama uses 10000 or 500000)")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.position)
        if not self.norm_eps > 0:
            raise ModelError(f"model config: norm_eps={self.norm_eps} must be > 0 (e.g. 1e-5)")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"model config: dropout={self.dropout} must be in [0, 1) (0 for pretraining)")
        return self

    # ----- presets -----
    @classmethod
    def preset(cls, flavour: str = "gpt2", size: str = "tiny", **overrides: Any) -> ModelConfig:
        """A named flavour ("gpt2" | "llama") at a named size ("tiny", "mini", "small", "gpt2-124M",
        "gpt2-350M").

        Overrides replace any field, e.g. ModelConfig.preset("llama", "mini", vocab_size=tok.vocab_size).
        """
        if flavour not in FLAVOURS:
            raise ConfigError(f"unknown model flavour {flavour!r}; {_hint(flavour, FLAVOURS)}")
        if size not in SIZES:
            raise ConfigError(f"unknown model size {size!r}; {_hint(size, SIZES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"unknown model config key {key!r}; {_hint(key, fields)}")
        values = {**FLAVOURS[flavour], **SIZES[size], **overrides}
        if flavour == "llama" and "n_kv_head" not in overrides and "n_kv_head" not in SIZES[size]:
            values["n_kv_head"] = values["n_head"]
        return cls(**values).validate()


FLAVOURS: dict[str, dict[str, Any]] = {
    "gpt2": dict(position="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu", bias=True,
                 tie_embeddings=True),
    "llama": dict(position="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                  bias=False, tie_embeddings=False),
}

# Sizes. tiny: ~0.1M parameters for tests; mini/small: a few M / ~10M for CPU runs in minutes;
# gpt2-124M/350M: GPT-2 small/medium shapes (GPU). n_kv_head only applies to the llama flavour's GQA tests.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, block_size=64),
    "mini": dict(vocab_size=8192, n_layer=4, n_head=4, d_model=256, block_size=256),
    "small": dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, block_size=512),
    "gpt2-124M": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, block_size=1024),
    "gpt2-350M": dict(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, block_size=1024),
}


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling: Any, position: str) -> None:
    """rope_scaling must be the llama3 dict with its four positive numbers (low < high_freq_factor)."""
    example = ('rope_scaling = {rope_type = "llama3", factor = 32.0, low_freq_factor = 1.0, '
               'high_freq_factor = 4.0, original_max_position_embeddings = 8192}')
    if position != "rope":
        raise ModelError(f"model config: rope_scaling is set but position={position!r}; "
                         "set position='rope' or remove rope_scaling")
    if not isinstance(scaling, dict):
        raise ModelError(f"model config: rope_scaling={scaling!r} must be a table like {example}")
    kind = scaling.get("rope_type")
    if kind != "llama3":
        raise ModelError(f"model config: rope_scaling.rope_type={kind!r} is not supported; llmlab implements "
                         "'llama3' only (remove rope_scaling for plain RoPE)")
    extra = sorted(set(scaling) - {"rope_type", *LLAMA3_SCALING_KEYS})
    if extra:
        raise ModelError(f"model config: rope_scaling has unknown key {extra[0]!r}; "
                         f"{_hint(extra[0], LLAMA3_SCALING_KEYS)}")
    for key in LLAMA3_SCALING_KEYS:
        value = scaling.get(key)
        if value is None:
            raise ModelError(f"model config: rope_scaling lacks {key!r}; llama3 scaling needs all of "
                             f"{', '.join(LLAMA3_SCALING_KEYS)}, e.g. {example}")
        if key == "original_max_position_embeddings":
            _positive(f"rope_scaling.{key}", value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelError(f"model config: rope_scaling.{key}={value!r} must be a positive number")
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ModelError(f"model config: rope_scaling.low_freq_factor={scaling['low_freq_factor']} must be "
                         f"below high_freq_factor={scaling['high_freq_factor']} (Llama 3.1 uses 1.0 and 4.0)")


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"model config: {key}={value!r} must be a positive integer")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelError(f"model config: {key}={value!r} is not allowed; use one of {', '.join(choices)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def _hint(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(sorted(valid))}"
