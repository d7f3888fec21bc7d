"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, so resuming at step N needs no scheduler state and a rollback to an older
checkpoint lands on exactly the LR the original run had there. Warmup follows GPT-2/GPT-3 practice
(Radford et al. 2019; Brown et al. 2020, appendix B); the cosine shape is SGDR without restarts
(Loshchilov & Hutter 2017, arXiv:1608.03983), decaying to `min_lr_ratio * lr` as in Chinchilla
(Hoffmann et al. 2022, which decays to 10% of the peak).

    step s (0-based index of the optimizer step about to be taken), W = warmup_steps, S = max_steps
    s <  W:        lr * (s + 1) / W                       (so the very first step already learns a little)
    W <= s <= S:   min + (lr - min) * 0.5 * (1 + cos(pi * (s - W) / (S - W)))
    s >  S:        min                                    (training past max_steps keeps the floor)
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    floor = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps or max_steps <= warmup_steps:
        return floor
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
