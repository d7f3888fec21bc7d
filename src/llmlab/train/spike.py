"""Loss-spike guard: detect loss / gradient-norm spikes, skip single bad steps, roll back sustained ones.

Large runs diverge from bad batches and from sudden gradient blow-ups. Two published recipes:

- PaLM (Chowdhery et al. 2022, arXiv:2204.02311, sec. 5.1): when a spike appears, restart from a checkpoint
  about 100 steps before it and skip roughly 200-500 data batches around it; the spikes came from the
  combination of particular batches with a particular model state, so skipping the data avoids them.
- OLMo (Groeneveld et al. 2024, arXiv:2402.00838): flag a step whose loss or gradient norm lies more than
  6 standard deviations above a rolling window of recent values.

`SpikeGuard` is a trainer Callback doing both. Before each optimizer step it sees the step's mean loss
and pre-clip global grad norm (identical on every rank, so every rank decides the same):

- detection: once armed (after `warmup` steps and `min_samples` values in the window), a value x is an
  outlier when it is more than `z` window standard deviations above the window mean AND more than
  `ratio` times the window mean (the z-score alone fires on a flat window whose sigma is tiny, the ratio
  alone ignores how noisy the series is). Loss and grad norm have their own thresholds. A non-finite loss
  or grad norm is always an outlier, armed or not. Outliers never enter the window.
- a single outlier is skipped: no optimizer update (the data is consumed), and its batch range is added
  to the trainer's skipped ranges and the loader state, so a later rollback or resume never reuses it.
- `sustain` consecutive outliers are a sustained spike: roll back to the newest kept checkpoint at least
  `rollback_steps` before the first outlier, skip the data from that checkpoint's loader position
  through the spike plus `skip_batches` more batches, and optionally multiply the LR by `lr_scale` for
  `lr_scale_steps` steps. After `max_rollbacks` rollbacks the run stops with TrainingDiverged.
- on every checkpoint after the warm-up it pins the checkpoints a future rollback may need (the newest one
  at least `rollback_steps` old and every newer one), so keep_last pruning never deletes them while disk use
  stays bounded by rollback_steps / ckpt_every + keep_last checkpoints.

Events ("spike", then the trainer's "skip"/"rollback") land in metrics.jsonl, and `llmlab plot` marks them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from llmlab.config import NonNegativeInt, PositiveFloat, PositiveInt, Range, check_config
from llmlab.errors import ConfigError
from llmlab.train.checkpoint import step_of
from llmlab.train.trainer import Callback, Rollback, Skip, StepStats, TrainingDiverged

Ratio = Annotated[float, Range(ge=1)]  # a multiple of the window mean


@dataclass
class SpikeConfig:
    """`spike.*` keys: the loss-spike guard (on by default; see llmlab/train/spike.py)."""

    enabled: bool = True
    window: PositiveInt = 100            # rolling window of recent (non-outlier) losses and grad norms
    warmup: NonNegativeInt = 100         # steps before the guard arms (early loss falls, grad norms swing)
    min_samples: PositiveInt = 20        # values the window needs before z-scores mean anything
    loss_z: PositiveFloat = 6.0          # OLMo's 6 sigma
    loss_ratio: Ratio = 1.5              # ... and at least this multiple of the window's mean loss
    grad_z: PositiveFloat = 6.0
    grad_ratio: Ratio = 5.0              # grad norms are noisier than losses: demand a bigger jump
    sustain: PositiveInt = 3             # consecutive outlier steps that trigger a rollback instead of a skip
    rollback_steps: NonNegativeInt = 100  # go back to a checkpoint at least this many steps before the spike
    skip_batches: NonNegativeInt = 100   # extra batches skipped after the spike's data (PaLM skips 200-500)
    lr_scale: PositiveFloat = 1.0        # multiply the LR by this after a rollback (1.0: unchanged)
    lr_scale_steps: NonNegativeInt = 0   # ... for this many steps
    max_rollbacks: PositiveInt = 3       # then stop with TrainingDiverged

    def check(self) -> None:
        if self.min_samples > self.window:
            raise ConfigError(f"spike.min_samples={self.min_samples} exceeds spike.window={self.window}; "
                              f"set spike.min_samples <= {self.window}")


class RollingStats:
    """Mean and population standard deviation of the last `size` values."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)

    def add(self, x: float) -> None:
        self.values.append(float(x))

    def __len__(self) -> int:
        return len(self.values)

    def mean_std(self) -> tuple[float, float]:
        n = len(self.values)
        mean = sum(self.values) / n
        return mean, math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)


def outlier_reason(x: float, stats: RollingStats, z: float, ratio: float, name: str,
                   armed: bool) -> str | None:
    """Why `x` is a spike against `stats` (None if it is not): non-finite, or both z-score and ratio rules."""
    if not math.isfinite(x):
        return f"{name} is {x}"
    if not armed:
        return None
    mean, std = stats.mean_std()
    zscore = (x - mean) / std if std > 0 else (math.inf if x > mean else 0.0)
    if zscore > z and x > ratio * mean:
        return f"{name} {x:.4g} is {zscore:.1f} sigma above the window mean {mean:.4g} ({x / mean:.2f}x)"
    return None


class SpikeGuard(Callback):
    """The trainer callback described in the module docstring."""

    name = "spike_guard"

    def __init__(self, cfg: SpikeConfig | None = None):
        self.cfg = check_config(cfg or SpikeConfig(), "spike.")
        self.losses = RollingStats(self.cfg.window)
        self.grads = RollingStats(self.cfg.window)
        self.streak: list[StepStats] = []      # consecutive outlier steps so far
        self.batch_start: dict[int, int] = {}  # step -> loader position before it (to find rollback data)
        self.rollbacks = 0
        self.lr_restore_at: int | None = None  # step at which a post-rollback LR scale ends
        self.events: list[dict] = []           # every spike seen (also in metrics.jsonl)

    # ---- detection

    def armed(self, step: int) -> bool:
        return step >= self.cfg.warmup and len(self.losses) >= self.cfg.min_samples

    def check(self, stats: StepStats) -> str | None:
        """The reason this step is an outlier, or None; a normal step's values join the window."""
        armed = self.armed(stats.step)
        c = self.cfg
        reason = (outlier_reason(stats.loss, self.losses, c.loss_z, c.loss_ratio, "loss", armed)
                  or outlier_reason(stats.grad_norm, self.grads, c.grad_z, c.grad_ratio, "grad norm", armed))
        if reason is None:
            self.losses.add(stats.loss)
            self.grads.add(stats.grad_norm)
        return reason

    def before_optimizer_step(self, trainer, stats: StepStats) -> Skip | Rollback | None:
        if stats.batch_range is not None:
            self.batch_start[stats.step] = stats.batch_range[0]
            self._forget_old(stats.step)
        reason = self.check(stats)
        if reason is None:
            self.streak = []
            return None
        self.streak.append(stats)
        event = {"type": "spike", "step": stats.step + 1, "loss": stats.loss, "grad_norm": stats.grad_norm,
                 "reason": reason, "consecutive": len(self.streak)}
        self.events.append(event)
        trainer._events.append(event)
        if len(self.streak) < self.cfg.sustain:
            self._record_skip(trainer, stats.batch_range)
            return Skip(reason=f"spike: {reason}")
        return self._rollback(trainer, reason)

    def _forget_old(self, step: int) -> None:
        horizon = step - self.cfg.rollback_steps - 10 * max(1, self.cfg.window)
        for s in [s for s in self.batch_start if s < horizon]:
            del self.batch_start[s]

    @staticmethod
    def _record_skip(trainer, batch_range: tuple[int, int] | None) -> None:
        """A skipped step's data is bad data: keep it out of every later replay (rollback or resume)."""
        if batch_range is None or batch_range[1] <= batch_range[0]:
            return
        trainer.skipped.append(tuple(batch_range))
        if hasattr(trainer.batches, "skip"):
            trainer.batches.skip(*batch_range)

    # ---- recovery

    def _rollback(self, trainer, reason: str) -> Rollback:
        first, last = self.streak[0], self.streak[-1]
        self.streak = []
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"loss spike at step {last.step + 1} after {self.rollbacks} rollbacks (spike.max_rollbacks="
                f"{self.cfg.max_rollbacks}): {reason}; lower optim.lr, raise optim.warmup_steps or check the "
                "data")
        ckpt = self._target(trainer, first.step)
        if ckpt is None:
            raise TrainingDiverged(
                f"sustained loss spike at step {last.step + 1} ({reason}) and no checkpoint before step "
                f"{first.step} to roll back to; checkpoint more often (train.ckpt_every)")
        to_step = step_of(ckpt)
        start = self.batch_start.get(to_step, first.batch_range[0] if first.batch_range else None)
        skip = None
        if start is not None and last.batch_range is not None:
            per_step = max(1, last.batch_range[1] - last.batch_range[0])
            skip = (start, last.batch_range[1] + self.cfg.skip_batches * per_step)
        self.rollbacks += 1
        lr_scale = None
        if self.cfg.lr_scale != 1.0 and self.cfg.lr_scale_steps > 0:
            lr_scale = self.cfg.lr_scale
            self.lr_restore_at = last.step + 1 + self.cfg.lr_scale_steps
        return Rollback(to_step=to_step, skip=skip, lr_scale=lr_scale,
                        reason=f"sustained spike ({self.cfg.sustain} steps): {reason}")

    def _target(self, trainer, spike_step: int) -> Path | None:
        """Newest checkpoint >= rollback_steps before the spike; failing that, the oldest one before it."""
        ckpt = trainer.checkpointer
        if ckpt is None:
            return None
        path = ckpt.latest(max_step=spike_step - self.cfg.rollback_steps)
        if path is None:
            earlier = [p for s, p in ckpt.all() if s <= spike_step]
            path = earlier[0] if earlier else None
        return path

    def on_step_end(self, trainer, record: dict) -> None:
        if self.lr_restore_at is not None and trainer.step >= self.lr_restore_at:
            trainer.lr_scale = 1.0
            self.lr_restore_at = None
            trainer._events.append({"type": "lr_restore", "step": trainer.step})

    def on_checkpoint(self, trainer, path: Path) -> None:
        """Pin what a future rollback may need: the newest checkpoint >= rollback_steps old and all newer."""
        ckpt = trainer.checkpointer
        if ckpt is None or not hasattr(ckpt, "pinned"):
            return
        if trainer.step < self.cfg.warmup:  # nothing to roll back for before the guard arms
            ckpt.pinned = set()
            return
        horizon = trainer.step - self.cfg.rollback_steps
        steps = [s for s, _ in ckpt.all()]
        old = [s for s in steps if s <= horizon]
        ckpt.pinned = {s for s in steps if s > horizon} | ({old[-1]} if old else set())

    # ---- state (saved in train_state.pt)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses.values), "grads": list(self.grads.values),
                "rollbacks": self.rollbacks, "lr_restore_at": self.lr_restore_at,
                "batch_start": [[s, b] for s, b in sorted(self.batch_start.items())]}

    def load_state_dict(self, state: dict) -> None:
        # A rollback restores an older state: the window goes back with it, but the retry count and a
        # pending LR restore belong to the present, so keep the larger of the two.
        self.losses.values.clear()
        self.losses.values.extend(state.get("losses", []))
        self.grads.values.clear()
        self.grads.values.extend(state.get("grads", []))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        saved = state.get("lr_restore_at")
        if saved is not None:
            self.lr_restore_at = max(self.lr_restore_at or 0, int(saved))
        for s, b in state.get("batch_start", []):
            self.batch_start.setdefault(int(s), int(b))
        self.streak = []
