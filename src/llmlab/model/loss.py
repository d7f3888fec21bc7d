"""Cross-entropy and per-token log-probabilities of the LM head without the full [tokens, vocab] logits.

Why: for a small model the logits are the largest tensors in a training step (8 x 256 tokens x 8192 vocab
is 67 MB in fp32, and log_softmax, its gradient and the logits' gradient are as large again). Computing the
head and the loss chunk by chunk, and the gradients right there in the forward pass, keeps every temporary
to a few MB: less memory traffic on CPU, less peak memory on GPU (the trick of Liger-Kernel's fused linear
cross-entropy, Hsu et al. 2024). The FLOPs are the same three matmuls as the unfused head.

    # the mean over kept targets (reduction="sum": their sum)
    loss = linear_cross_entropy(hidden [N, d], weight [V, d], targets [N], ignore_index=-100)

The result equals F.cross_entropy(hidden @ weight.T, targets, ignore_index=...) (mean over non-ignored
targets); its backward multiplies the stored gradients by the incoming scale, so loss scaling for
gradient accumulation works as usual.

    # log p(target) per token, float32 [N] (DPO and PPO weigh each token's gradient differently)
    logp = linear_token_logprobs(hidden [N, d], weight [V, d], targets [N], ignore_index=-100)

Its backward recomputes each chunk's logits (the per-token gradient arrives only then), so it costs one
matmul more than the loss but holds no [N, V] tensor across forward and backward.
"""

from __future__ import annotations

import torch


def _chunk_rows(vocab: int, device: torch.device) -> int:
    # ~16 MB of fp32 logits per chunk on CPU (cache friendly), ~256 MB on GPUs (big matmuls).
    budget = 2**22 if device.type == "cpu" else 2**26
    return max(64, budget // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, mean: bool):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kept = targets != ignore_index
        n = kept.sum().clamp(min=1).to(torch.float32) if mean else torch.ones((), device=h.device)
        safe = targets.masked_fill(~kept, 0)[:, None]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        step = _chunk_rows(weight.shape[0], h.device)
        for s in range(0, h.shape[0], step):
            hc, keep, tgt = h[s:s + step], kept[s:s + step], safe[s:s + step]
            # Softmax by hand, in place, so each chunk's logits are touched four times and never copied:
            # shift by the row max, exponentiate, sum, then turn the exponentials into the gradient.
            logits = (hc @ weight.T).float()
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits.gather(1, tgt).squeeze(1)
            total_exp = logits.exp_().sum(dim=-1)
            total += ((total_exp.log() - picked) * keep).sum()
            if want_h or want_w:
                # d(loss)/d logits = (softmax - onehot(target)) / n on kept rows (n = 1 for the sum), 0 on
                # ignored ones.
                scale = keep / n
                g = logits.mul_((scale / total_exp)[:, None])
                g.scatter_add_(1, tgt, -scale[:, None])
                g = g.to(h.dtype)
                if want_h:
                    grad_h[s:s + step] = g @ weight
                if want_w:
                    grad_w.addmm_(g.T.float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against targets, over targets != ignore_index: their mean
    (reduction="mean") or sum ("sum", what token-weighted objectives add up across micro-batches).

    hidden [..., d], targets [...] (same leading shape), weight [V, d]. Returns a float32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'")
    h, t, _ = _kept_rows(hidden, targets, ignore_index)
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, reduction == "mean")


def _kept_rows(hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Flattened hidden rows and targets, only those whose target counts, and their row indices (None when
    all count). SFT and DPO ignore prompt tokens, often most of a row: the head's [N, V] matmul, the costly
    part, then runs only where it matters."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    kept = t != ignore_index
    if bool(kept.all()):
        return h, t, None
    rows = kept.nonzero().squeeze(1)
    return h.index_select(0, rows), t.index_select(0, rows), rows


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (backward recomputes in the same)."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T)[target] per row, chunk by chunk. Unlike the loss, the gradient reaching each
    row is only known in backward, so backward recomputes each chunk's logits (one extra matmul) from h
    and the saved log-normaliser instead of keeping [N, V] probabilities."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int):
        dtype = _compute_dtype(h)
        kept = targets != ignore_index
        safe = targets.masked_fill(~kept, 0)[:, None]
        w = weight.to(dtype)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        step = _chunk_rows(weight.shape[0], h.device)
        for s in range(0, h.shape[0], step):
            logits = (h[s:s + step].to(dtype) @ w.T).float()
            lse[s:s + step] = logits.logsumexp(dim=-1)
            out[s:s + step] = logits.gather(1, safe[s:s + step]).squeeze(1) - lse[s:s + step]
        out.masked_fill_(~kept, 0.0)
        ctx.save_for_backward(h, weight, safe, kept, lse)
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, safe, kept, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(ctx.dtype)
        g_out = grad_out.float() * kept
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        step = _chunk_rows(weight.shape[0], h.device)
        for s in range(0, h.shape[0], step):
            hc, gc = h[s:s + step].to(ctx.dtype), g_out[s:s + step, None]
            # d log p(target) / d logits = onehot(target) - softmax, times the incoming gradient.
            g = (hc @ w.T).float().sub_(lse[s:s + step, None]).exp_().mul_(-gc)
            g.scatter_add_(1, safe[s:s + step], gc)
            g = g.to(ctx.dtype)
            if want_h:
                grad_h[s:s + step] = g @ w
            if want_w:
                grad_w.addmm_(g.T.float(), hc.float())
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -100) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[..., target] in float32, 0 where targets == ignore_index.

    hidden [..., d], targets [...] (same leading shape), weight [V, d]; returns targets' shape. Equal to
    log_softmax(hidden @ weight.T).gather(-1, targets) without the [N, V] logits or log-probabilities.
    """
    h, t, rows = _kept_rows(hidden, targets, ignore_index)
    out = _LinearTokenLogprobs.apply(h, weight, t, ignore_index)
    if rows is not None:
        out = out.new_zeros(targets.numel()).index_copy(0, rows, out)
    return out.view(targets.shape)
