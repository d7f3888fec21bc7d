"""Fault injection for the spike guard's tests and benchmarks; training itself never uses it.

- `CorruptBatches(loader, at)`: wraps a batch source; the batches at loader positions `at` are replaced by
  poison: every target is one fixed token, which a trained model finds very unlikely, so the loss jumps
  and the gradient drags every prediction toward that token. The fault is tied to the data position, as
  real bad data is: a rollback that skips those positions never sees it again.
- `GradScaleFault(steps, factor)`: a callback + loss wrapper that multiplies the gradient of the given
  optimizer steps by `factor` (the loss value is unchanged), as a numerical blow-up would. It fires once
  per step index, so a replay after a rollback is clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from llmlab.train.trainer import Callback


class CorruptBatches:
    """A batch source that serves poisoned batches at the given loader positions (see module docstring)."""

    def __init__(self, loader: Any, at: Iterable[int], token: int = 0):
        self.loader = loader
        self.at = {int(s) for s in at}
        self.token = int(token)
        self.served: list[int] = []  # positions actually poisoned (a skipped position never is)

    def next_batch(self):
        position = self.loader._skip_forward(self.loader.step) if hasattr(self.loader, "_skip_forward") \
            else self.loader.step
        x, y = self.loader.next_batch()
        if position in self.at:
            self.served.append(position)
            y = torch.full_like(y, self.token)
        return x, y

    @property
    def step(self) -> int:
        return self.loader.step

    def skip(self, a: int, b: int) -> None:
        self.loader.skip(a, b)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class GradScaleFault(Callback):
    """Multiply the gradient of optimizer steps `steps` by `factor` once each (wrap the loss with `wrap`)."""

    name = "grad_scale_fault"

    def __init__(self, steps: Iterable[int], factor: float = 1e4):
        self.steps = {int(s) for s in steps}
        self.factor = float(factor)
        self.fired: set[int] = set()
        self.trainer = None

    def on_fit_start(self, trainer) -> None:
        self.trainer = trainer

    def wrap(self, loss_fn: Callable) -> Callable:
        def faulty(model, batch):
            loss, metrics = loss_fn(model, batch)
            step = self.trainer.step if self.trainer is not None else -1
            if step in self.steps and step not in self.fired:
                # value unchanged, gradient times factor: loss + (f - 1) * (loss - stopgrad(loss))
                loss = loss + (self.factor - 1.0) * (loss - loss.detach())
            return loss, metrics

        return faulty

    def on_step_end(self, trainer, record: dict) -> None:
        if trainer.step - 1 in self.steps:
            self.fired.add(trainer.step - 1)

    def before_optimizer_step(self, trainer, stats):
        if stats.step in self.steps:
            self.fired.add(stats.step)  # also counts a step that is then skipped or rolled back
        return None
