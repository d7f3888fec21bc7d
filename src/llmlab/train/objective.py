"""Objectives: what the one training loop (trainer.py) minimises, and how a run is judged.

An objective is a loss, plus the few things a loss needs from the loop:

    class Objective:
        name = "lm"                      # shown in summaries
        best_metric = "val_loss"         # key of evaluate()'s result that picks the best checkpoint
        higher_is_better = False
        loss(model, batch) -> LossOutput # this micro-batch's loss SUM and the number of units it sums over
        prepare_step(trainer)            # before each optimizer step (PPO collects its rollouts here)
        param_groups(module)             # [{"params": [...], "lr_mult": 10.0}, ...] or None (all at 1x)
        evaluate(model) -> dict          # held-out metrics, best_metric among them ({} when there are none)
        state_dict() / load_state_dict() # kept in train_state.pt (a PPO KL controller, say)

Why a sum and a weight instead of a mean: an SFT micro-batch keeps only the assistant tokens, so micro-batches
(and ranks) learn from different numbers of tokens. The trainer adds up every micro-batch's `loss_sum` and
`weight` over the step and over all ranks and divides once, so every kept token counts the same whatever the
split: one micro-batch of 8 rows, 4 of 2, or 2 ranks of 4 give the same gradient. `metrics` are sums over
the same units and are logged as sum / weight; the key "n_tokens" (tokens processed, for tokens/s) is summed
and not divided.

The model is called through whatever wraps it (DDP, FSDP2, torch.compile), so every output goes through
`model(...)`: `model(x, targets=y, reduction="sum")` is the summed next-token loss, `output="logprobs"`
the per-token log-probabilities, `output="scores"` a scalar head's outputs, `output="hidden"` the final
hidden states (see llmlab.model.transformer). A plain `loss_fn(model, batch) -> (mean loss, metrics)` is also
accepted by the Trainer (`as_objective`): each of its micro-batches then weighs the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.train.checkpoint import unwrap


@dataclass
class LossOutput:
    """One micro-batch's contribution to a step (see the module docstring)."""

    loss_sum: torch.Tensor            # 0-d: SUM of per-unit losses over this micro-batch (backpropagated)
    weight: torch.Tensor | float      # how many units it sums over (kept tokens, pairs, episodes)
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # sums over the same units;
                                      # "n_tokens": tokens processed, summed, not divided


class Objective:
    """Base class: override `loss`, and whatever else the objective needs (defaults: nothing)."""

    name: str = "lm"
    best_metric: str = "val_loss"
    higher_is_better: bool = False

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch) -> LossOutput")

    def prepare_step(self, trainer) -> None:
        """Called before each optimizer step, before its micro-batches are drawn."""

    def param_groups(self, module: nn.Module) -> list[dict] | None:
        """Parameter groups with their own LR multiplier ({"params": [...], "lr_mult": x}); parameters left
        out train at 1x. None: every parameter at 1x."""
        return None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, `best_metric` among them; {} when the objective has no held-out data."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (tensors and primitives only: train_state.pt is weights_only)."""


def batch_tokens(batch: Any) -> int:
    """Token count of a batch: numel of its first tensor (the inputs, by convention)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
        return batch_tokens(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return batch_tokens(batch[0])
    return 0


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    segment_ids: torch.Tensor | None = None, ignore_index: int = -100) -> LossOutput:
    """Summed next-token cross-entropy over targets != ignore_index, weighted by their count; fp32 softmax.

    An llmlab Transformer (bare or wrapped) computes it chunk by chunk without the full logits; any other
    module takes the plain logits path.
    """
    kept = (y != ignore_index).sum()
    if hasattr(unwrap(model), "loss"):
        extra = {} if segment_ids is None else {"segment_ids": segment_ids}
        loss_sum = model(x, targets=y, ignore_index=ignore_index, reduction="sum", **extra)
    else:
        logits = model(x)
        loss_sum = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), ignore_index=ignore_index,
                                   reduction="sum")
    return LossOutput(loss_sum, kept, {"n_tokens": x.numel()})


class NextToken(Objective):
    """Next-token cross-entropy, token-weighted: pretraining on (x, y) batches, and masked training on
    (x, y) or (x, y, segment_ids) batches whose ignored targets are `ignore_index`."""

    name = "lm"

    def __init__(self, eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 ignore_index: int = -100):
        self.eval_fn, self.ignore_index = eval_fn, ignore_index

    def loss(self, model: nn.Module, batch) -> LossOutput:
        return next_token_loss(model, *batch, ignore_index=self.ignore_index)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.eval_fn(model) if self.eval_fn is not None else {}


class LossFunction(Objective):
    """A plain loss_fn(model, batch) -> (mean loss, metrics) as an objective: each micro-batch weighs 1, so
    the step's loss is the mean of its micro-batches' losses and metrics their means."""

    name = "loss_fn"

    def __init__(self, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None):
        self.loss_fn, self.eval_fn = loss_fn, eval_fn

    def loss(self, model: nn.Module, batch) -> LossOutput:
        loss, metrics = self.loss_fn(model, batch)
        metrics = dict(metrics)
        metrics.setdefault("n_tokens", batch_tokens(batch))
        return LossOutput(loss, 1.0, metrics)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.eval_fn(model) if self.eval_fn is not None else {}


def as_objective(objective: Objective | Callable, eval_fn: Callable | None = None) -> Objective:
    """An Objective as is; a loss function wrapped as LossFunction(loss_fn, eval_fn)."""
    if isinstance(objective, Objective):
        if eval_fn is not None:
            raise TypeError("pass eval_fn only with a plain loss function; an Objective evaluates itself")
        return objective
    if not callable(objective):
        raise TypeError(f"expected an Objective or a loss function, got {type(objective).__name__}")
    return LossFunction(objective, eval_fn)
