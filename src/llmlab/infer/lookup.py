"""Draft-free proposals for speculative decoding: prompt lookup (n-gram matching in the context).

Text often repeats itself: code reuses names, answers quote the question, and small models fall into loops.
Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; the same idea as the copy mechanism of Yang et al. 2023,
"Inference with Reference: Lossless Acceleration of Large Language Models") guesses that the context will
continue as it did the last time its final n tokens occurred:

    context  ... A B C D E ... X A B C | ?      last 3-gram "A B C" occurred earlier, followed by "D E ..."
    proposal D E ...                            -> verified by the target like a draft model's tokens

The n-gram size is tried from max_ngram down to min_ngram; the most recent earlier occurrence wins. The
copy is recursive: if the continuation runs into the end of the context, it keeps copying from the tokens
already proposed, so a loop of period 2 still yields K proposals instead of 2.

The proposal is a deterministic function of the context, which for speculative sampling means q is one-hot
(see llmlab.infer.speculative): verification stays exact. A row with no match proposes nothing and its
round is an ordinary decoding step. Everything is vectorised over the batch (no per-row Python loop).
"""

from __future__ import annotations

import torch

from llmlab.errors import ConfigError


class PromptLookup:
    """Propose up to K tokens per row by copying what followed the last earlier occurrence of the row's final
    n-gram (n = max_ngram .. min_ngram). Pass an instance (or the string "lookup") as generate(draft=...)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"prompt lookup {name}={value!r} must be an integer >= 1 (e.g. 3)")
        if min_ngram > max_ngram:
            raise ConfigError(f"prompt lookup min_ngram={min_ngram} exceeds max_ngram={max_ngram}; "
                              "make min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"

    def propose(self, ctx: torch.Tensor, n: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx LongTensor [B, W] holds each row's tokens at positions < n[b] (later entries are ignored;
        W >= n + K). -> (proposal [B, K], count [B]): row b proposes proposal[b, :count[b]] (count 0 or K)."""
        B, W = ctx.shape
        cont = self.match(ctx, n)  # where the copied continuation starts, -1 if no match
        found = cont >= 0
        if K == 0 or not bool(found.any()):
            return ctx.new_zeros(B, 0), torch.zeros(B, dtype=torch.long, device=ctx.device)
        # Copy one token at a time into a scratch copy, so that the source may run into the tokens just
        # proposed (source index cont + j < n + j always, hence already written).
        ext = ctx.clone()
        rows = torch.arange(B, device=ctx.device)
        src, dst = cont.clamp(min=0), n.clone()
        for _ in range(K):
            ext[rows, dst.clamp(max=W - 1)] = ext[rows, src]
            src, dst = src + 1, dst + 1
        proposal = ext.gather(1, (n[:, None] + torch.arange(K, device=ctx.device)).clamp(max=W - 1))
        return proposal, found.long() * K

    def match(self, ctx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Per row, the position right after the most recent earlier occurrence of the row's final n-gram
        (largest n that matches first), or -1. An occurrence must be followed by at least one token, which
        excludes the final n-gram itself."""
        B = ctx.shape[0]
        device = ctx.device
        cont = torch.full((B,), -1, dtype=torch.long, device=device)
        L = int(n.max())
        for g in range(self.max_ngram, self.min_ngram - 1, -1):
            if L <= g:
                continue
            windows = ctx[:, :L].unfold(1, g, 1)  # [B, L-g+1, g]: windows[b, i] = ctx[b, i:i+g]
            suffix = ctx.gather(1, (n - g).clamp(min=0)[:, None] + torch.arange(g, device=device))
            starts = torch.arange(L - g + 1, device=device)
            hit = (windows == suffix[:, None]).all(-1) & (starts[None] + g < n[:, None])
            last = (hit.long() * (starts + 1)).amax(1) - 1  # most recent start, -1 if none
            take = (cont < 0) & (last >= 0)
            cont = torch.where(take, last + g, cont)
        return cont
