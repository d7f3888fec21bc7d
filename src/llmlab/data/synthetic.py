"""Synthetic token streams with known structure, for tests, benchmarks and smoke runs.

`affine_stream` is mostly predictable: every `period`-th token is uniformly random and each other token
follows from the previous one by x -> (5x + 3) mod vocab (a bijection when vocab is a power of two, so
every token has exactly one successor). A model that learns the rule approaches a loss of
ln(vocab) / period nats/token, far below the unigram baseline of ln(vocab), which makes learning,
resume-exactness and spike tests meaningful within a few dozen steps of a tiny model.
"""

from __future__ import annotations

import numpy as np


def affine_stream(n: int, vocab: int, seed: int, period: int = 16) -> np.ndarray:
    """n int64 tokens: a random token every `period` positions, x -> (5x + 3) % vocab in between."""
    rng = np.random.default_rng(seed)
    out, x = np.empty(n, dtype=np.int64), 0
    for i in range(n):
        x = int(rng.integers(vocab)) if i % period == 0 else (5 * x + 3) % vocab
        out[i] = x
    return out
