"""The decoder-only Transformer: GPT-2 and Llama flavours in one module, small enough to read in one sitting.

    x = tok_emb(idx) (+ pos_emb)                       # learned positions (GPT-2) or none here (RoPE)
    for each block:  x = x + attn(norm(x));  x = x + mlp(norm(x))      # pre-norm residual blocks
    logits = lm_head(norm(x))                          # or scores = score(norm(x)) with head="scalar"

One forward computes what `output` asks for (every kind goes through forward, so DDP and FSDP2 see the call):
    model(idx)                                   logits [B, T, V] (a scalar head: scores [B, T], float32)
    model(idx, targets=y)                        mean next-token cross-entropy (reduction="sum": the sum)
    model(idx, targets=y, output="logprobs")     log p(y[b, t] | idx[b, :t+1]) [B, T], float32
    model(idx, output="scores" | "hidden")       a scalar head's outputs [B, T] / final-normed hidden states
model.token_logprobs, model.scores and model.hidden are these calls by name. The loss and the log-probs are
computed chunk by chunk from the hidden states (loss.py), never holding the [B*T, V] logits.

Packed rows: `segment_ids` [B, T] marks examples packed into one row (a new segment starts wherever the
id changes). A token attends only to earlier tokens of its own segment and positions restart at 0 in each,
so every example is computed exactly as if it were alone in its row.

Ragged rows: `layout` (a RaggedLayout) runs sequences of any lengths as one row [1, N] of their tokens, no
padding: the linears see only real tokens, and attention gathers each sequence's queries and keys into
rows of their own (so it costs what the sequences cost, not a long packed row). Sequences may share tokens:
RL lays a prompt out once for the several responses that read it (llmlab.align.rollout.pack).

Attention is causal self-attention through torch's scaled_dot_product_attention (flash / memory-efficient
kernels where the device has them) with the explicit softmax(QK^T/sqrt(d) + mask)V kept beside it for checking
(`model.attn_impl = "math"`). Grouped-query attention shares each key/value head among n_head/n_kv_head query
heads (Ainslie et al. 2023). RoPE (Su et al. 2021) uses the Hugging Face Llama "rotate_half" layout (the two
halves of each head are the rotated pairs), so HF Llama q/k weights load without a permutation.

Parameter names map one-to-one onto Hugging Face checkpoints:
    tok_emb.weight          wte / embed_tokens          pos_emb.weight   wpe (learned positions only)
    blocks.i.attn_norm      ln_1 / input_layernorm      blocks.i.mlp_norm  ln_2 / post_attention_layernorm
    blocks.i.attn.qkv       c_attn (transposed) / cat(q_proj, k_proj, v_proj) along the output dim
    blocks.i.attn.proj      attn.c_proj (transposed) / o_proj
    blocks.i.mlp.fc         mlp.c_fc (transposed) / cat(gate_proj, up_proj) along the output dim
    blocks.i.mlp.proj       mlp.c_proj (transposed) / down_proj
    norm                    ln_f / model.norm           lm_head.weight   lm_head (absent from files when tied)

Initialisation follows GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2*n_layer)
so the residual stream's variance does not grow with depth (Radford et al. 2019, section 2.3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import CheckpointError, ConfigError, ModelError
from llmlab.fsutil import atomic_dir
from llmlab.model.config import ModelConfig
from llmlab.model.kv_cache import CacheStep, KVCache
from llmlab.model.loss import linear_cross_entropy, linear_token_logprobs

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# config.json entries beside the ModelConfig fields, each describing modules a plain Transformer does not
# have, with the loader that builds them. Transformer.load refuses such a checkpoint unless its caller
# handles the entry (the `prepare` hook); the model itself knows nothing of what the entry means.
EXTENSIONS = {"quantization": "llmlab.infer.quant.load_model", "lora": "llmlab.align.lora.load_lora"}


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [block_size, head_dim] and sin with the sign of rotate_half folded in (first half negated).

    HF: q*cos + rotate_half(q)*sin with rotate_half(x) = cat(-x2, x1). Here roll(q, hd/2) = cat(x2, x1) and
    the minus sign lives in the table, which saves two ops per step.
    """
    hd = cfg.head_dim
    inv_freq = rope_inv_freq(cfg, device)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    sign = torch.cat([-torch.ones(hd // 2, device=device), torch.ones(hd // 2, device=device)])
    return angles.cos(), angles.sin() * sign


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The head_dim/2 rotary frequencies theta^(-2i/d) (Su et al. 2021), with Llama 3.1's scaling when
    configured.

    Llama 3.1 context extension (Meta, "The Llama 3 Herd of Models", 2024, and the Llama 3.1 model card): with
    L = original_max_position_embeddings, a frequency whose wavelength 2*pi/f is longer than L/low_freq_factor
    is divided by `factor`, one shorter than L/high_freq_factor is kept, and in between the two are blended
    with weight smooth = (L/wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
    f' = (1 - smooth) * f/factor + smooth * f. The blend equals f/factor at smooth = 0 and f at smooth = 1, so
    clamping smooth to [0, 1] covers all three ranges in one expression.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((scaling["original_max_position_embeddings"] / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / scaling["factor"] + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def math_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """softmax(QK^T / sqrt(d) + mask) V, written out; the reference the SDPA path is tested against."""
    if k.shape[1] != q.shape[1]:  # GQA: query head h reads key/value head h // (n_head / n_kv_head)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        T, L = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, dropout_p)
    return att @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.impl = "sdpa"

    def forward(self, x, rope, cache: KVCache | None, step: CacheStep | None):
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)  # [B, heads, T, hd]
        # split (not slicing): its backward is one cat instead of zero-filled copies per slice.
        if rope is not None:
            qk, v = qkv.split([H + KV, KV], dim=1)
            q, k = apply_rope(qk, *rope).split([H, KV], dim=1)  # rotate q and k together: one set of ops
        else:
            q, k, v = qkv.split([H, KV, KV], dim=1)
        p = self.dropout if self.training else 0.0
        if isinstance(step, RaggedLayout):
            return self._out(step.attend(q, k, v, p, self.impl))
        mask, causal = (None, True) if step is None else (step.mask, step.is_causal)
        if cache is not None:
            k, v = cache.update(self.layer, step, k, v)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                               enable_gqa=KV != H)
        else:
            y = math_attention(q, k, v, mask, causal, p)
        return self._out(y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' merged outputs [B, T, n_head * head_dim] through the output projection (and dropout)."""
        y = self.proj(y)
        p = self.dropout if self.training else 0.0
        return F.dropout(y, p) if p else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's gate and up projections are one matmul (rows [gate; up]), split after.
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_dim * (2 if self.swiglu else 1), bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        y = self.proj(h)
        return F.dropout(y, self.dropout) if self.training and self.dropout else y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope, cache, step):
        h = self.attn(self.attn_norm(x), rope, cache, step)
        if isinstance(step, RaggedLayout) and step.outputs is not None:
            x = x.index_select(1, step.outputs)  # the only positions a later reader wants
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if cfg.head == "scalar":
            self.score = nn.Linear(cfg.d_model, 1, bias=False)  # as HF's *ForSequenceClassification
        else:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
        self._make_rope()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _make_rope(self, device=None) -> None:
        if self.config.position == "rope":
            cos, sin = rope_tables(self.config, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ----- forward -----
    @property
    def attn_impl(self) -> str:
        return self.blocks[0].attn.impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ("sdpa", "math"):
            raise ConfigError(f"attn_impl={impl!r} is unknown; use 'sdpa' (fast) or 'math' "
                              "(explicit softmax)")
        for block in self.blocks:
            block.attn.impl = impl

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False,
                targets: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean", *,
                segment_ids: torch.Tensor | None = None, output: str | None = None,
                layout: RaggedLayout | None = None, temperature: float = 1.0):
        """idx LongTensor [B, T] -> what `output` names (module docstring): "logits" [B, T, vocab] (the
        default for an LM head), "scores" [B, T] (the default for a scalar head), "hidden" [B, T, d_model]
        (also return_hidden=True), "loss" (the default with `targets`: cross-entropy against targets [B, T],
        ignore_index skipped, `reduction` "mean" or "sum") or "logprobs" (log p(targets) [B, T], float32,
        0 at ignore_index; of the tempered softmax(logits / temperature) when temperature is not 1).

        With `cache`, idx continues each row at cache.pos (see kv_cache.py) and the cache advances by T.
        With `segment_ids` [B, T] (no cache), packed examples do not see each other (module docstring);
        with `layout` (no cache), idx [1, N] holds ragged sequences (RaggedLayout); if it names outputs,
        every result covers those K positions only and targets are [1, K], theirs.
        """
        output = output or ("loss" if targets is not None else "hidden" if return_hidden else
                            "scores" if self.config.head == "scalar" else "logits")
        self._check_output(output, targets)
        B, T = idx.shape
        if cache is None and layout is not None:
            layout.check(idx, self.config.block_size)
            step, positions = layout, layout.positions
        elif cache is None:
            if T > self.config.block_size:
                raise ModelError(f"input of {T} tokens is longer than the model's block_size "
                                 f"{self.config.block_size}; shorten it to at most {self.config.block_size} "
                                 "tokens")
            step, positions = None, slice(0, T)
            if segment_ids is not None:
                step = segment_step(segment_ids)
                positions = step.positions
        else:
            if segment_ids is not None or layout is not None:
                raise ModelError("segment_ids and layout apply to passes without a KV cache; drop one of "
                                 "them")
            step = cache.begin(B, T)
            positions = step.positions
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            sliced = isinstance(positions, slice)
            x = x + (self.pos_emb.weight[positions] if sliced else self.pos_emb(positions))
        rope = None
        if self.config.position == "rope":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            # [T, hd] broadcasts over [B, heads, T, hd]; per-row positions [B, T, hd] need a heads axis.
            rope = (cos, sin) if cos.dim() == 2 else (cos[:, None], sin[:, None])
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout)
        for i, block in enumerate(self.blocks):
            last = layout is not None and i == len(self.blocks) - 1
            x = block(x, rope, cache, step.final if last else step)
        if cache is not None:
            cache.commit(step)
        x = self.norm(x)
        if output == "loss":
            return self._cross_entropy(x, targets, ignore_index, reduction)
        if output == "logprobs":  # (h / T) @ W.T = logits / T
            return self._token_logprobs(x if temperature == 1 else x / temperature, targets, ignore_index)
        return x if output == "hidden" else self.head(x)

    def _check_output(self, output: str, targets: torch.Tensor | None) -> None:
        """ModelError for an output this model's head cannot give, or one that lacks its targets."""
        lm = {"logits", "loss", "logprobs"}
        if output not in lm | {"scores", "hidden"}:
            raise ModelError(f"output={output!r} is unknown; use logits, loss, logprobs, scores or hidden")
        if (output in lm) != (self.config.head == "lm") and output != "hidden":
            raise ModelError(f"output={output!r} needs head={'lm' if output in lm else 'scalar'!r} but "
                             f"this model has head={self.config.head!r}")
        if output in ("loss", "logprobs") and targets is None:
            raise ModelError(f"output={output!r} needs targets [B, T]")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """For final-normed hidden states [..., d_model] (as from return_hidden=True): logits [..., vocab],
        or with a scalar head the scores [...] in float32."""
        if self.config.head == "scalar":
            return self.score(hidden).squeeze(-1).float()
        return self.lm_head(hidden)

    def token_logprobs(self, idx: torch.Tensor, targets: torch.Tensor,
                       segment_ids: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """log p(targets[b, t] | idx[b, :t+1]) [B, T] in float32 (0 where targets == ignore_index), computed
        chunk by chunk like the loss. Under DDP/FSDP call model(idx, targets=..., output="logprobs")."""
        return self(idx, targets=targets, ignore_index=ignore_index, segment_ids=segment_ids,
                    output="logprobs")

    def scores(self, idx: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """A scalar head's output at every position [B, T], float32 (reading it at the last real token is
        the objective's job)."""
        return self(idx, segment_ids=segment_ids, output="scores")

    def hidden(self, idx: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, d_model]."""
        return self(idx, segment_ids=segment_ids, output="hidden")

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of idx [B, T] against targets [B, T] (ignore_index skipped).

        Equal to F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()) but computed chunk by chunk
        without the full logits tensor (see loss.py): faster on CPU, lighter on GPU memory.
        """
        return self(idx, targets=targets, ignore_index=ignore_index)

    def _token_logprobs(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if isinstance(self.lm_head, nn.Linear):
            return linear_token_logprobs(h, self.lm_head.weight, targets, ignore_index)
        logits = self.lm_head(h).float()  # a swapped-in head (e.g. quantized): the plain way
        kept = targets != ignore_index
        picked = logits.log_softmax(-1).gather(-1, targets.masked_fill(~kept, 0)[..., None]).squeeze(-1)
        return picked.masked_fill(~kept, 0.0)

    def _cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       reduction: str) -> torch.Tensor:
        if isinstance(self.lm_head, nn.Linear):  # plain or routed (llmlab.infer.cpu_linear): same weight
            return linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index, reduction)
        logits = self.lm_head(h).float()  # a swapped-in head (e.g. quantized): the plain way
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                               reduction=reduction)

    # ----- accounting -----
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops the token and position tables (Kaplan et
        al. 2020's N); with tied embeddings that also drops the LM head, which is the same tensor."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) = 6N + 12 * n_layer * d_model * seq_len.

        N counts every parameter that takes part in a matmul: the non-embedding parameters plus the LM head
        (vocab x d_model, counted even when tied, since the output projection is real compute). 6N is 2 FLOPs
        per multiply-add times 3 (forward, and backward for activations and weights). The second term is the
        attention score and value matmuls, QK^T and AV: 2 * 2 * seq_len * d_model per layer forward, times 3,
        as in PaLM (Chowdhery et al. 2022, appendix B) and Chinchilla (Hoffmann et al. 2022, appendix F);
        it counts the full T x T product, ignoring the causal mask, by the usual convention.
        """
        cfg = self.config
        seq_len = cfg.block_size if seq_len is None else seq_len
        tied_head = cfg.head == "lm" and cfg.tie_embeddings
        n = self.num_params(non_embedding=True) + (cfg.vocab_size * cfg.d_model if tied_head else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len

    # ----- checkpoints -----
    def save(self, path: str | Path) -> None:
        """Write PATH/config.json + PATH/model.safetensors atomically (PATH is replaced whole)."""
        with atomic_dir(path) as tmp:
            self.save_into(tmp)

    def save_into(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors into an existing directory, for callers (the trainer) that
        assemble a larger checkpoint inside their own atomic_dir."""
        from safetensors.torch import save_file

        directory = Path(directory)
        meta = asdict(self.config)
        # A model whose modules were swapped (e.g. quantized) carries its extension entry as an attribute.
        meta.update({key: getattr(self, key) for key in EXTENSIONS if getattr(self, key, None)})
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # safetensors refuses two names for one storage; the tied head is rebuilt from tok_emb on load.
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (self.config.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": "llmlab"})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype=None, *,
             prepare: Callable[[nn.Module, dict], None] | None = None) -> Transformer:
        """Load a directory written by save(); dtype None keeps the stored dtype, "auto" picks per device.

        prepare(model, meta) is called with the model still on the meta device and config.json as a dict,
        before the weights are assigned, so a caller can put modules of the stored shapes in place (as
        llmlab.infer.quant.load_model does for quantized linears). Without it, a config.json with an
        EXTENSIONS entry is refused with a CheckpointError naming the loader to use.
        """
        from llmlab.device import resolve_device, resolve_dtype

        path = Path(path)
        meta = read_meta(path)
        config = config_from_meta(meta, path / CONFIG_FILE)
        if prepare is None:
            refuse_extensions(path, meta)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE}; point at a complete checkpoint "
                                  "directory (config.json + model.safetensors)")
        device = resolve_device(device) if isinstance(device, str) else device
        state = read_weights(weights, device)
        with torch.device("meta"):  # no random init, no second copy of the weights
            model = cls(config)
            if prepare is not None:
                prepare(model, meta)
        check_state(model, state, weights)
        model.load_state_dict(state, strict=False, assign=True)
        if config.head == "lm" and config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        model._make_rope(device)
        # Rope tables follow the weights' dtype (as HF casts cos/sin to the activations' dtype).
        model.to(resolve_dtype(dtype, device) if dtype is not None else model.tok_emb.weight.dtype)
        return model.eval()


def segment_step(segment_ids: torch.Tensor) -> CacheStep:
    """The attention mask and positions of packed rows: a segment is a run of equal ids; a token sees the
    earlier tokens of its own run (block-diagonal causal mask [B, 1, T, T]) and positions restart at 0."""
    B, T = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    index = torch.arange(T, device=segment_ids.device)
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    runs = starts.cumsum(dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    mask = (runs[:, :, None] == runs[:, None, :]) & causal
    # No cache: a CacheStep here only carries the mask and the positions to the attention layers.
    return CacheStep(T, 0, None, T, mask[:, None], False, positions)


class RaggedLayout:
    """Sequences of any lengths as one row of N tokens (module docstring), built by RaggedLayout.build:
        positions [1, N]   each token's position in its sequence(s)
        groups             attention rows of similar sizes, each (queries [S, Lq]: a row's query tokens as
                           indices into the N, padded with 0; keys [S, Lk]: the tokens its queries may
                           read, padded with 0; mask [S, Lq, Lk]: True where a query may attend a key, a
                           real key at a position <= the query's). Grouping by size keeps the padding of
                           each group's rows, which attention computes, small.
        slot [M]           where each of the M tokens that go on sits among the groups' queries, flattened
                           and concatenated (M = N)
        outputs [K]        None, or (in `final`, the last block's layout) the only tokens whose outputs
                           are wanted: the last block computes attention outputs and the MLP for those
                           alone, since no later layer reads the others (their keys are still computed)
        final              the layout of the last block (self, unless outputs were asked for)
    Every token is a query in exactly one row; a token may be a key in several (a shared prompt)."""

    def __init__(self, positions, groups, slot, outputs=None, final=None):
        self.positions, self.groups, self.slot = positions, groups, slot
        self.outputs, self.final = outputs, final if final is not None else self

    @classmethod
    def build(cls, positions: list[int], rows: list[tuple[list[int], list[int]]], device=None,
              outputs: list[int] | None = None) -> RaggedLayout:
        """From each token's position and, per attention row, (its query tokens, the tokens they may read):
        a query attends the keys of its row at positions up to its own. With `outputs` (token indices,
        ascending) the forward returns theirs only, [1, K, ...], and takes targets [1, K] for them."""
        pos = torch.tensor(positions, device=device)
        layout = cls(pos[None], *_attention_rows(pos, rows, range(len(positions)), device))
        if outputs is not None:
            wanted = set(outputs)
            kept = [([t for t in q if t in wanted], k) for q, k in rows]
            kept = [(q, k) for q, k in kept if q]
            layout.final = cls(pos[None], *_attention_rows(pos, kept, outputs, device),
                               outputs=torch.tensor(outputs, device=device))
        return layout

    def check(self, idx: torch.Tensor, block_size: int) -> None:
        """ModelError unless idx is the one row [1, N] this layout describes, its positions in the context."""
        if tuple(idx.shape) != tuple(self.positions.shape):
            raise ModelError(f"input of shape {tuple(idx.shape)} does not match its ragged layout of "
                             f"{self.positions.shape[1]} tokens; pass idx [1, N] as the layout was built")
        if int(self.positions.max()) >= block_size:
            raise ModelError(f"a ragged sequence reaches position {int(self.positions.max())} beyond the "
                             f"model's block_size {block_size}; shorten it")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
               impl: str) -> torch.Tensor:
        """q [1, H, N, hd], k and v [1, KV, N, hd] -> attention output [1, M, H * hd] (heads merged), row
        by row, for the M tokens that go on (all N, or `outputs`)."""
        H, hd = q.shape[1], q.shape[-1]
        by_token = [x[0].transpose(0, 1) for x in (q, k, v)]  # [N, heads, hd]

        def rows(x, index):  # [N, heads, hd] -> [S, heads, L, hd], laid out as [S, L, heads, hd]
            return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:]).transpose(1, 2)

        outs = []
        for queries, keys, mask in self.groups:
            qs, ks, vs = rows(by_token[0], queries), rows(by_token[1], keys), rows(by_token[2], keys)
            if impl == "sdpa":
                y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], dropout_p=dropout_p,
                                                   enable_gqa=ks.shape[1] != qs.shape[1])
            else:
                y = math_attention(qs, ks, vs, mask[:, None], False, dropout_p)
            outs.append(y.transpose(1, 2).reshape(-1, H * hd))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, self.slot)[None]


GROUP_SHRINK = 0.6   # a new group of attention rows starts where a row's size falls below this share


def _attention_rows(pos: torch.Tensor, rows: list[tuple[list[int], list[int]]], going_on, device):
    """(groups, slot) of RaggedLayout for `rows`; slot follows the tokens `going_on`."""
    def size(row):
        return len(row[0]) * len(row[1])

    buckets: list[list[tuple[list[int], list[int]]]] = []
    for row in sorted(rows, key=size, reverse=True):
        if buckets and size(row) >= GROUP_SHRINK * size(buckets[-1][0]):
            buckets[-1].append(row)
        else:
            buckets.append([row])
    groups, order = [], []
    for bucket in buckets:
        Lq, Lk = max(len(q) for q, _ in bucket), max(len(k) for _, k in bucket)
        queries = torch.tensor([q + [0] * (Lq - len(q)) for q, _ in bucket], device=device)
        keys = torch.tensor([k + [0] * (Lk - len(k)) for _, k in bucket], device=device)
        real_q = torch.tensor([[i < len(q) for i in range(Lq)] for q, _ in bucket], device=device)
        real_k = torch.tensor([[j < len(k) for j in range(Lk)] for _, k in bucket], device=device)
        mask = real_k[:, None, :] & (pos[keys][:, None, :] <= pos[queries][:, :, None])
        mask[:, :, 0] |= ~real_q  # a padding query reads one key (its output is dropped): no empty softmax
        groups.append((queries, keys, mask))
        order += [q[i] if i < len(q) else None for q, _ in bucket for i in range(Lq)]
    where = {t: i for i, t in enumerate(going_on)}
    slot = [0] * len(where)
    for flat, t in enumerate(order):
        if t is not None:
            slot[where[t]] = flat
    return groups, torch.tensor(slot, device=device)


def read_meta(path: Path) -> dict:
    """PATH/config.json as a dict (ModelConfig fields and any EXTENSIONS entries), with CheckpointError
    naming the file for every failure."""
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist; pass a directory holding "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE} (e.g. runs/NAME/ckpt-STEP)")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}; point at a complete checkpoint "
                              "directory")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds a JSON {type(meta).__name__}, not an object of model settings; "
                              "re-save the checkpoint")
    return meta


def read_weights(file: Path, device: str | torch.device = "cpu",
                 fix: str = "re-save the checkpoint or use another one") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with one CheckpointError naming it (and `fix`) when it is truncated
    or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is not a readable safetensors file ({reason}); it is truncated or "
                              f"corrupt: {fix}") from e


def config_from_meta(meta: dict, source: Path) -> ModelConfig:
    """The ModelConfig of a config.json dict (EXTENSIONS entries left out); CheckpointError naming
    `source`."""
    from llmlab.config import from_dict

    try:
        return from_dict(ModelConfig, {k: v for k, v in meta.items() if k not in EXTENSIONS}).validate()
    except (ConfigError, ModelError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def read_config(path: Path) -> ModelConfig:
    """ModelConfig from PATH/config.json, with CheckpointError naming the file for every failure."""
    return config_from_meta(read_meta(path), path / CONFIG_FILE)


def refuse_extensions(path: Path, meta: dict) -> None:
    """CheckpointError if config.json has an EXTENSIONS entry: a plain Transformer cannot hold its weights."""
    for key, loader in EXTENSIONS.items():
        if meta.get(key):
            raise CheckpointError(f"checkpoint {path} has a {key!r} entry in {CONFIG_FILE}, which "
                                  f"Transformer.load does not build; load it with {loader}(path)")


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Every tensor the model needs is present with its shape, and nothing else is (CheckpointError
    otherwise)."""
    expected = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # tolerated if a writer kept the duplicate
    for name, t in expected.items():
        if name not in state:
            raise CheckpointError(f"{source} lacks tensor {name!r} (shape {tuple(t.shape)}) that config.json "
                                  "requires; the weights and config.json come from different models")
        if state[name].shape != t.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but "
                                  f"config.json implies {tuple(t.shape)}; the weights and config.json do not "
                                  "match")
        if state[name].is_floating_point() != t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} is stored as {state[name].dtype} where the "
                                  f"model needs {t.dtype}; the file is corrupt or not a model of this kind")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source} has tensor {extra[0]!r} that the model from config.json does not "
                              f"use ({len(extra)} unexpected in all); the weights and config.json do not "
                              "match")
