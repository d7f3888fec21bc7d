"""Text from a made-up lexicon, for benchmarks that need prompts and answers in words: enough distinct words
for a BPE to fill a vocabulary of about 1k, and the same words on every run (a fixed seed)."""

from __future__ import annotations

import random

_letters = random.Random(3)
WORDS = ["".join(_letters.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_letters.randint(2, 5)))
         for _ in range(800)]


def text(rng: random.Random, words: int) -> str:
    """`words` words of the lexicon, drawn with rng."""
    return " ".join(rng.choice(WORDS) for _ in range(words))
