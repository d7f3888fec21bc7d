"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (arXiv:2306.00978).

Observation: the weights that matter are those multiplying large activations. Scaling input channel j of
W up by s_j (and the activation down by s_j) leaves W x unchanged, but shrinks that channel's relative
rounding error, because the group's scale is set by its largest weights and rarely by the scaled ones.
AWQ therefore searches

    s = mean_t |x_tj| ^ alpha,   alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}

(normalised so that sqrt(max(s) min(s)) = 1) for the alpha that minimises the layer's output error
||W X - Q(W diag(s)) diag(s)^-1 X|| on calibration activations. alpha = 0 is plain RTN, so the search never
does worse than RTN on its sample. Then, per output row and group, a clipping search shrinks the group's
range to max|w| * r for r in {1, 1 - 1/n_grid, ..., 1 - max_shrink} if that lowers the group's own output
error (trading a little clipping error for a finer grid). It is on by default, as in the paper, and
`clip=False` (`llmlab quantize --awq-no-clip`) turns it off: a lower layer-wise error need not mean a lower
perplexity, since the clips trade many small errors for a few large ones, and on small models the search
raised perplexity (docs/performance.md).

The division by s must happen somewhere for free. As in the paper, it is folded into the op before the layer
when that is exact:
    attn_norm -> attn.qkv      norm weight (and bias) / s
    mlp_norm  -> mlp.fc        norm weight (and bias) / s
    v rows of attn.qkv -> attn.proj   (attention is linear in V; only without GQA, where channel j of the
                                        projection's input is channel j of V -- the reference does the same)
    up rows of mlp.fc  -> mlp.proj    (SwiGLU: silu(gate) * up is linear in up)
    final norm -> lm_head      (when the head is quantized)
GELU is not homogeneous, so for the GELU MLP the paper's fallback applies: the 1/s multiply is kept as an
explicit per-channel input scale in front of the quantized mlp.proj (their "ScaledActivation"), one
elementwise multiply per call. Following the reference, q and k rows are not clipped (their error is
amplified through the softmax, which a per-layer output error does not see).

Both searches score candidates on every calibration token at once: the output error of a weight error D is
sum_t ||D x_t||^2 = sum_n d_n^T (X^T X) d_n, so only mean|x| and the Gram matrix X^T X of each layer's inputs
are collected (where the reference implementation subsamples tokens to keep the search affordable).
Blocks are processed in order; each block's statistics come from the already-quantized earlier blocks.
"""

from __future__ import annotations

import torch

from llmlab.infer.quant.rtn import fake_quantize


def normalised_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_mean.float().clamp(min=1e-4) ** alpha
    return s / (s.max() * s.min()).sqrt()


def _quadratic_error(D: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """sum_t ||D x_t||^2 = sum_n d_n^T (X^T X) d_n for a weight error D [N, K] (gram = X^T X)."""
    return ((D @ gram) * D).sum()


def search_scale(W: torch.Tensor, gram: torch.Tensor, act_mean: torch.Tensor, bits: int,
                 group_size: int | None, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale s [K] for W [N, K] -> (s, alpha).

    The output error over the calibration tokens, ||X W^T - X W_eff^T||^2, is the quadratic form of the
    weight error with the inputs' Gram matrix X^T X (the Hessian GPTQ uses), so every token counts and each
    candidate costs N K^2 instead of tokens x N x K.
    """
    W, gram = W.detach().float(), gram.float()
    best = (float("inf"), None, 0.0)
    for i in range(n_grid):
        alpha = i / n_grid
        s = normalised_scales(act_mean, alpha)
        W_eff = fake_quantize(W * s, bits, group_size) / s  # what (X / s) Q(W s)^T computes, as one matrix
        err = float(_quadratic_error(W - W_eff, gram))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def search_clip(W: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None, n_grid: int = 20,
                max_shrink: float = 0.5, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row (int8) or per-(row, group) (int4) clip value minimising that group's own output error
    sum_t (x_t,g . (w_g - q(w_g)))^2, a quadratic form with the group's diagonal block of the Gram matrix.

    Returns max|w| kept: [N] or [N, K/G]. `rows` (bool [N]) limits the search; other rows keep their full
    range.
    """
    W, gram = W.detach().float(), gram.float()
    N, K = W.shape
    G = K if bits == 8 else group_size
    ng = K // G
    blocks = gram.reshape(ng, G, ng, G).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [ng, G, G]
    amax = W.reshape(N, ng, G).abs().amax(-1)  # [N, ng]
    best_clip = amax.clone()
    idx = torch.arange(N, device=W.device) if rows is None else rows.nonzero().flatten()
    w = W[idx].reshape(len(idx), ng, G)
    best_err = torch.full((len(idx), ng), float("inf"), device=W.device)
    for i in range(int(max_shrink * n_grid)):
        clip = amax[idx] * (1 - i / n_grid)
        d = w - fake_quantize(w.reshape(len(idx), K), bits, group_size, clip).reshape_as(w)
        err = (torch.einsum("ngk,gkj->ngj", d, blocks) * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip[idx] = torch.where(better, clip, best_clip[idx])
    return best_clip.reshape(N) if bits == 8 else best_clip


def awq_quantize_layer(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int | None, n_grid: int = 20,
                       clip: bool = True):
    """AWQ for one weight on its own: -> (s, W_scaled, clip) with W_scaled = W diag(s) to be quantized with
    `clip` and fed X / s. Used for layers considered alone (tests); the model path folds s (see above)."""
    X = X.float()
    gram = X.t() @ X
    s, _ = search_scale(W, gram, X.abs().mean(0), bits, group_size, n_grid)
    W_scaled = W.float() * s
    c = search_clip(W_scaled, gram / s[:, None] / s[None, :], bits, group_size, n_grid) if clip else None
    return s, W_scaled, c


# ----- the model walk -----
class _Stats:
    """Per-input-channel mean |x| and the Gram matrix X^T X over every calibration token of one layer."""

    def __init__(self):
        self.abs_sum, self.gram, self.count = None, None, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.gram is None:
            self.abs_sum = torch.zeros(x.shape[-1], device=x.device)
            self.gram = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        self.abs_sum += x.abs().sum(0)
        self.gram.addmm_(x.t(), x)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.count


def _fold_into_norm(norm, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def _scale_rows(linear, rows: slice, s: torch.Tensor) -> None:
    linear.weight[rows].div_(s[:, None].to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias[rows].div_(s.to(linear.bias.dtype))


def _scale_columns(linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s[None, :].to(linear.weight.dtype))


@torch.no_grad()
def awq_model(model, calib: torch.Tensor, bits: int, group_size: int | None, *, include_head: bool = False,
              n_grid: int = 20, clip: bool = True, batch_size: int = 8, progress: bool = True) -> list[str]:
    """AWQ every linear of model.blocks (and lm_head if asked) in place; returns the names of the layers
    that carry an explicit input scale (GELU MLP projections, see the module docstring). clip=False skips
    the clipping search (plain ranges after the scaling; see the module docstring for when that is better)."""
    from tqdm.auto import tqdm

    from llmlab.infer.quant import sequential as seq
    from llmlab.infer.quant.rtn import rtn_linear

    cfg = model.config
    hd, H, KV = cfg.head_dim, cfg.n_head, cfg.kv_heads
    v_rows = slice((H + KV) * hd, (H + 2 * KV) * hd)
    scaled_inputs: list[str] = []

    def search(linear, stats):
        return search_scale(linear.weight, stats.gram, stats.mean, bits, group_size, n_grid)[0]

    def finish(root, name, linear, gram, clip_rows=None, input_scale=None):
        """Clip search on the final (scaled) weight and inputs, then RTN into a QuantLinear."""
        if input_scale is not None:
            gram = gram * input_scale[:, None] * input_scale[None, :]
        clips = search_clip(linear.weight, gram, bits, group_size, n_grid, rows=clip_rows) if clip else None
        q = rtn_linear(linear, bits, group_size, clips, input_scale)
        q.kernel = "dequant"
        seq.replace_module(root, name, q)

    def rescaled(gram, s):  # the Gram matrix of X / s
        return gram / s[:, None] / s[None, :]

    xs, rope = seq.capture_block_inputs(model, calib, batch_size)
    for i, block in enumerate(tqdm(model.blocks, desc=f"AWQ int{bits}", unit="block", disable=not progress)):
        attn, mlp = block.attn, block.mlp
        watch = {"qkv": attn.qkv, "o": attn.proj, "fc": mlp.fc, "down": mlp.proj}
        stats = {k: _Stats() for k in watch}
        seq.feed_inputs(block, xs, rope, watch, lambda k, x, stats=stats: stats[k].add(x))
        gram = {k: st.gram for k, st in stats.items()}

        s = search(attn.qkv, stats["qkv"])  # attn_norm -> qkv
        _fold_into_norm(block.attn_norm, s)
        _scale_columns(attn.qkv, s)
        gram["qkv"] = rescaled(gram["qkv"], s)
        if KV == H:  # v rows -> attention output projection
            s = search(attn.proj, stats["o"])
            _scale_rows(attn.qkv, v_rows, s)
            _scale_columns(attn.proj, s)
            gram["o"] = rescaled(gram["o"], s)
        s = search(mlp.fc, stats["fc"])  # mlp_norm -> fc
        _fold_into_norm(block.mlp_norm, s)
        _scale_columns(mlp.fc, s)
        gram["fc"] = rescaled(gram["fc"], s)
        s = search(mlp.proj, stats["down"])
        _scale_columns(mlp.proj, s)
        down_scale = None
        if mlp.swiglu:  # up rows of fc -> down projection
            _scale_rows(mlp.fc, slice(cfg.ffn_dim, 2 * cfg.ffn_dim), s)
            gram["down"] = rescaled(gram["down"], s)
        else:  # GELU: keep 1/s as the projection's input scale
            down_scale = 1.0 / s
            scaled_inputs.append(f"blocks.{i}.mlp.proj")

        v_only = torch.zeros(attn.qkv.out_features, dtype=torch.bool, device=attn.qkv.weight.device)
        v_only[v_rows] = True
        finish(block, "attn.qkv", attn.qkv, gram["qkv"], clip_rows=v_only)
        finish(block, "attn.proj", attn.proj, gram["o"])
        finish(block, "mlp.fc", mlp.fc, gram["fc"])
        finish(block, "mlp.proj", mlp.proj, gram["down"], input_scale=down_scale)
        xs = seq.run_block(block, xs, rope)
    if include_head:
        st = _Stats()
        for x in xs:
            st.add(model.norm(x))
        s = search(model.lm_head, st)
        _fold_into_norm(model.norm, s)
        _scale_columns(model.lm_head, s)
        finish(model, "lm_head", model.lm_head, rescaled(st.gram, s))
    return scaled_inputs
