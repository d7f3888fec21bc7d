"""Draft-free proposals for speculative decoding: prompt lookup (n-gram matching in the context).

Text often repeats itself: code reuses names, answers quote the question, and small models fall into loops.
Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; the same idea as the copy mechanism of Yang et al. 2023,
"Inference with Reference: Lossless Acceleration of Large Language Models") guesses that the context will
continue as it did the last time its final n tokens occurred:

    context  ... A B C D E ... X A B C | ?      last 3-gram "A B C" occurred earlier, followed by "D E ..."
    proposal D E ...                            -> verified by the target like a draft model's tokens

The n-gram size is tried from max_ngram down to min_ngram; the most recent earlier occurrence wins. The
copy is recursive: if the continuation runs into the end of the context, it keeps copying from the tokens
already proposed, so a loop of period 2 still yields a long proposal.

How many tokens to copy: K, whatever the match length. A rejected guess costs only its position in the
target's verification forward, which is nearly free where that forward is bound by streaming the weights, so
a long guess that may fail beats a short one (measured against capping a g-token match at g(g+1)/2 guesses:
docs/performance.md).

The proposal is a deterministic function of the context, which for speculative sampling means q is one-hot
(see llmlab.infer.speculative): verification stays exact. A row with no match proposes nothing and its round
is an ordinary decoding step.

Cost: an NgramIndex per sequence maps every n-gram to where it last started, updated as tokens arrive, so a
lookup is max_ngram dictionary probes instead of a scan of the context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmlab.errors import ConfigError


class PromptLookup:
    """Proposal rule: copy up to K tokens of what followed the most recent earlier occurrence of the
    context's final n-gram (n = max_ngram .. min_ngram). Pass an instance (or the string "lookup") as
    generate(draft=...).

    fallback: a draft model (a Transformer sharing the target's vocabulary) that proposes in the rounds where
    the context has no match (see llmlab.infer.speculative: lookup first, then the draft); None keeps
    decoding draft-free."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, fallback=None):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"prompt lookup {name}={value!r} must be an integer >= 1 (e.g. 4)")
        if min_ngram > max_ngram:
            raise ConfigError(f"prompt lookup min_ngram={min_ngram} exceeds max_ngram={max_ngram}; "
                              "make min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram, self.fallback = max_ngram, min_ngram, fallback

    def __repr__(self) -> str:
        fallback = "" if self.fallback is None else f", fallback={type(self.fallback).__name__}"
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram}{fallback})"

    def index(self, tokens: Iterable[int] = ()) -> NgramIndex:
        """A fresh index over `tokens`, to be extended as the sequence grows."""
        return NgramIndex(range(self.max_ngram, self.min_ngram - 1, -1), tokens)

    def propose(self, tokens: Sequence[int], K: int) -> list[int]:
        """The proposal (0..K tokens) for a context, without keeping an index."""
        return self.index(tokens).propose(K)


class NgramIndex:
    """One growing token sequence and, for each n-gram size, a map from n-gram to its most recent start among
    the occurrences followed by at least one token (so the sequence's own final n-gram is not a match)."""

    def __init__(self, sizes: Iterable[int], tokens: Iterable[int] = ()):
        self.sizes = sorted(sizes, reverse=True)
        self.tokens: list[int] = []
        self.last: dict[int, dict[tuple[int, ...], int]] = {g: {} for g in self.sizes}
        self.extend(tokens)

    def extend(self, new: Iterable[int]) -> None:
        toks = self.tokens
        for t in new:
            j = len(toks)  # t's position: every n-gram ending at j-1 is now followed by a token
            for g in self.sizes:
                if j >= g:
                    self.last[g][tuple(toks[j - g:j])] = j - g
            toks.append(int(t))

    def match(self) -> tuple[int, int]:
        """(position right after the matched occurrence, n-gram size) for the largest size that matches, or
        (-1, 0)."""
        toks = self.tokens
        for g in self.sizes:
            if len(toks) > g:
                start = self.last[g].get(tuple(toks[-g:]))
                if start is not None:
                    return start + g, g
        return -1, 0

    def propose(self, K: int) -> list[int]:
        """K tokens copied from after the match (none without one)."""
        cont, g = self.match()
        toks, n = self.tokens, len(self.tokens)
        out: list[int] = []
        for j in range(K if g else 0):
            i = cont + j  # < n + j: either in the context or among the tokens just proposed
            out.append(toks[i] if i < n else out[i - n])
        return out
