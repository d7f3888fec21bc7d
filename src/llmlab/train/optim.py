"""AdamW with weight decay on weight matrices only, plus the optimizer settings every objective shares.

Decoupled weight decay (Loshchilov & Hutter 2019, arXiv:1711.05101) pulls weights toward zero; it is
meant for the matrices that mix features (linear layers, embeddings), not for the 1-D tensors that set
a scale or offset (norm gains, biases), where decay just fights the gradient (the GPT-2/nanoGPT split:
every parameter with dim >= 2 decays, the rest does not). Tied embeddings appear once because
`named_parameters()` deduplicates shared tensors.

On CUDA and CPU the fused AdamW kernel does the whole update in one pass over each tensor (on CPU a
vectorised C++ loop, instead of a dozen separate elementwise ops per tensor); elsewhere (MPS) the foreach
implementation batches the per-tensor ops. Both give the same maths as the reference loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from llmlab.config import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range

Beta = Annotated[float, Range(ge=0, lt=1)]


@dataclass
class OptimConfig:
    """Optimizer and LR-schedule settings (see schedule.py for the shape of the schedule)."""

    lr: PositiveFloat = 6e-4                # peak learning rate, reached at the end of warmup
    betas: tuple[Beta, Beta] = (0.9, 0.95)  # beta2=0.95 is the LLM choice (GPT-3): steadier with big batches
    weight_decay: NonNegativeFloat = 0.1
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0       # clip the global grad norm to this; 0 disables clipping
    warmup_steps: NonNegativeInt = 100
    max_steps: PositiveInt = 1000           # length of the run in optimizer steps; the cosine ends here
    min_lr_ratio: Fraction = 0.1            # the cosine decays to lr * min_lr_ratio


def param_groups(model: nn.Module, weight_decay: float, lr_groups: list[dict] | None = None) -> list[dict]:
    """AdamW groups: tensors with dim >= 2 decay, the rest (biases, norm gains) do not.

    `lr_groups` ([{"params": [...], "lr_mult": x}, ...], an objective's param_groups) give some parameters
    their own LR multiplier; each is split by the same decay rule, and every trainable parameter of `model`
    it leaves out trains at lr_mult 1. Each group records its "lr_mult": the trainer sets its LR to the
    schedule's LR times that.
    """
    claimed: set[int] = set()
    specs = []
    for i, group in enumerate(lr_groups or []):
        params = [p for p in group["params"] if p.requires_grad]
        if any(id(p) in claimed for p in params):
            raise ValueError(f"param group {i} repeats a parameter of an earlier group")
        claimed.update(id(p) for p in params)
        specs.append((f"group{i}.", params, float(group.get("lr_mult", 1.0))))
    rest = [p for _, p in model.named_parameters() if p.requires_grad and id(p) not in claimed]
    specs.insert(0, ("", rest, 1.0))
    groups = []
    for prefix, params, lr_mult in specs:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [{"params": decay, "weight_decay": weight_decay, "name": f"{prefix}decay",
                    "lr_mult": lr_mult},
                   {"params": no_decay, "weight_decay": 0.0, "name": f"{prefix}no_decay", "lr_mult": lr_mult}]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    lr_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ..., lr_groups)`; fused on CUDA and CPU, foreach elsewhere. The LR is
    set each step (times each group's lr_mult)."""
    device = next(model.parameters()).device
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, lr_groups), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, **fast)
