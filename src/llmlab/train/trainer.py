"""The one training loop every objective uses: pretraining, SFT, reward modelling, DPO, PPO.

An objective plugs in by supplying two things:

    objective: Objective                       its loss(model, batch) -> LossOutput(loss_sum, weight,
                                               metrics), evaluation, best metric, per-step preparation,
                                               LR groups and state (llmlab/train/objective.py). A plain
                                               loss_fn(model, batch) -> (mean loss, metrics) also works:
                                               each of its micro-batches then weighs the same.
    batches.next_batch() -> batch              plus state_dict()/load_state_dict() so resume is exact
                                               (and skip(a, b) if a spike guard will roll back).

Everything else is shared: gradient accumulation (`accum_steps` micro-batches per optimizer step; each
micro-batch's loss SUM is backpropagated and the gradient is divided once by the weight summed over every
micro-batch of the step and every rank, so kept tokens count the same however they are split), global
grad-norm clipping (the pre-clip norm and whether it clipped are logged), the LR schedule (a pure function
of the step, times `lr_scale`, times each parameter group's `lr_mult`), bf16 autocast on GPUs that support
it (fp32 on CPU), periodic evaluation through `objective.evaluate(model)`, checkpoints every `ckpt_every`
steps and at the end (the newest `keep_last` plus, with `keep_best`, the best by the objective's
best_metric, named by best.json), exact resume, metrics.jsonl (and TensorBoard scalars with
`tensorboard`), and a tqdm bar with loss, tokens/s and MFU.

Extension points (issue 4 and later objectives hook in here, the loop itself stays as it is):
- `callbacks`: objects with any of on_fit_start(trainer), before_optimizer_step(trainer, stats) ->
  None | Skip | Rollback, on_step_end(trainer, record), on_checkpoint(trainer, path), and
  state_dict()/load_state_dict() (saved in train_state.pt). A loss-spike guard is a callback: it sees
  the step's loss and pre-clip grad norm before the update and can skip the update or roll back.
- `rollback(Rollback)`: restore an older checkpoint, tell the batch source to skip the bad data range,
  optionally scale the LR; the skipped ranges are kept by the trainer and re-applied after every restore.
- `model` may arrive wrapped by a separate parallelize step (DDP, torch.compile; FSDP2 shards in
  place): the loop only calls it, `unwrap()` finds the module to save, gradient sync is switched off on
  all but the last micro-batch, loss/weight/metric sums are added up over ranks in one all-reduce (the
  wrapper's mean over ranks is undone when the gradient is divided by the global weight), and only rank 0
  writes files.
  Parallelize before constructing the Trainer: the optimizer is built over the parameters it finds.
- `checkpointer`: a Checkpointer (or a distributed subclass) does all checkpoint I/O.
- `should_stop`: set it (e.g. from a SIGTERM handler) and the loop checkpoints and returns after the step.
  It is a request: the loop acts on it only once every rank has agreed on it (see _agree), so a signal that
  lands between two collectives on one rank cannot make that rank leave the loop alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmlab.config import NonEmptyStr, NonNegativeInt, PositiveFloat, PositiveInt, check_config
from llmlab.device import resolve_dtype
from llmlab.errors import CheckpointError, LLMLabError
from llmlab.train.checkpoint import Checkpointer, rng_state, set_rng_state, unwrap
from llmlab.train.distributed import barrier, world
from llmlab.train.metrics import MetricsWriter, Throughput, mfu, peak_flops
from llmlab.train.objective import Objective, as_objective, batch_tokens
from llmlab.train.optim import OptimConfig, build_optimizer
from llmlab.train.schedule import lr_at


@dataclass
class TrainConfig:
    """Loop settings shared by every objective (optimizer settings live in OptimConfig)."""

    accum_steps: PositiveInt = 1         # micro-batches per optimizer step
    tokens_per_step: PositiveInt | None = None  # pretraining: accum_steps = tokens / (batch * block * world)
    eval_every: NonNegativeInt = 100     # steps between evaluations (0: only at the end)
    eval_batches: PositiveInt = 20       # val batches per evaluation
    ckpt_every: NonNegativeInt = 500     # steps between checkpoints (0: only at the end)
    keep_last: NonNegativeInt = 3        # checkpoints kept on disk (0: keep all)
    keep_best: bool = True               # also keep the best checkpoint by the objective's metric (lowest
                                         # val_loss for pretraining; RUN_DIR/best.json names it)
    tensorboard: bool = False            # also write scalars to RUN_DIR/tensorboard (pip install tensorboard)
    log_every: PositiveInt = 1           # steps between metrics.jsonl records (eval/ckpt steps always logged)
    device: NonEmptyStr = "auto"         # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "fp32", "bf16", "float32", "bfloat16"] = "auto"  # autocast dtype: auto = bf16 on
                                         # GPUs that have it, fp32 on CPU (fp16 would need loss scaling)
    seed: NonNegativeInt = 1337
    out_dir: NonEmptyStr = "runs"        # the run directory is out_dir/run_name
    run_name: NonEmptyStr = "run"
    overwrite: bool = False              # start over in an existing run directory (deletes its checkpoints)
    progress: bool = True                # tqdm progress bar
    peak_flops: PositiveFloat | None = None  # override the device peak FLOP/s used for MFU (see metrics.py)
    plot: bool = True                    # write PNG plots at the end
    max_minutes: PositiveFloat | None = None  # wall-clock cap: then evaluate, checkpoint and stop early
    threads: NonNegativeInt = 0          # CPU threads for torch (0: torch's default, one per core); 1 is
                                         # often fastest on a machine busy with other work


@dataclass
class StepStats:
    """What a callback sees before the optimizer step: loss and pre-clip grad norm of the whole step."""

    step: int                 # index of the step being taken (0-based; the record will say step + 1)
    loss: float
    grad_norm: float
    lr: float
    tokens: int               # tokens in this step
    metrics: dict[str, float]
    batch_range: tuple[int, int] | None  # batch-source positions [start, end) this step read, if known


@dataclass
class Skip:
    """Do not apply this step's update (the data is consumed and the step counter advances)."""

    reason: str = ""


@dataclass
class Rollback:
    """Restore the newest checkpoint at or before `to_step` and skip batch positions `skip` = (a, b)."""

    to_step: int
    skip: tuple[int, int] | None = None
    lr_scale: float | None = None   # multiply the schedule by this from now on (None: unchanged)
    reason: str = ""


class Callback:
    """No-op base for trainer callbacks; override what you need."""

    name = "callback"

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def before_optimizer_step(self, trainer: Trainer, stats: StepStats) -> Skip | Rollback | None: ...
    def on_step_end(self, trainer: Trainer, record: dict) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


MAX_NONFINITE = 10  # consecutive non-finite steps before the run stops instead of skipping


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class TrainingDiverged(LLMLabError):
    """Loss or gradients stayed non-finite; lower the LR or resume from an earlier checkpoint."""


def _syncs_gradients(model: nn.Module) -> bool:
    """Whether `model` is wrapped by DDP or sharded by FSDP2 (both average gradients over ranks)."""
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    return ddp or hasattr(model, "set_requires_gradient_sync")


class Trainer:
    """Runs optimizer steps of `objective` over `batches` (see the module docstring for the contract)."""

    def __init__(self, model: nn.Module, objective: Objective | Callable[[nn.Module, Any], tuple],
                 batches: Any, optim: OptimConfig, train: TrainConfig, *, run_dir: str | Path | None = None,
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 flops_per_token: float | None = None, tokenizer_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), optimizer: torch.optim.Optimizer | None = None,
                 checkpointer: Checkpointer | None = None):
        optim, train = check_config(optim, "optim."), check_config(train, "train.")
        self.objective = as_objective(objective, eval_fn)  # eval_fn: only with a plain loss function
        self.model, self.batches = model, batches
        self.optim_cfg, self.cfg = optim, train
        self.module = unwrap(model)
        self.device = next(self.module.parameters()).device
        self.amp_dtype = resolve_dtype(train.dtype, self.device)
        self.optimizer = optimizer or build_optimizer(self.module, optim,
                                                      self.objective.param_groups(self.module))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.world_size = world()
        # DDP and FSDP2 average the gradients over ranks; dividing by the global weight undoes that mean.
        self._ranks_averaged = self.world_size if _syncs_gradients(model) else 1
        self.is_main = self.rank == 0
        self.checkpointer = checkpointer or (
            Checkpointer(self.run_dir, train.keep_last, tokenizer_dir, train.keep_best)
            if self.run_dir is not None else None)
        if self.checkpointer is not None:
            self._judge_by_objective(self.checkpointer)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl",
                                     self.run_dir / "tensorboard" if train.tensorboard else None,
                                     ) if self.run_dir is not None else None
        self.callbacks = list(callbacks)
        if flops_per_token is None and hasattr(self.module, "flops_per_token"):
            flops_per_token = self.module.flops_per_token()
        self.flops_per_token = flops_per_token
        self.step = 0            # optimizer steps completed
        self.tokens = 0          # tokens trained on (all ranks)
        self.lr_scale = 1.0      # multiplies the schedule (a spike guard may lower it after a rollback)
        self.skipped: list[tuple[int, int]] = []  # batch ranges skipped by rollbacks, re-applied on restore
        self.should_stop = False
        self.throughput = Throughput()
        self.last_eval: dict[str, float] = {}
        self._events: list[dict] = []
        self._nonfinite = 0
        self._peak: float | None = None
        self._saved_step: int | None = None
        self._eval_step: int | None = None  # the step last_eval was measured at

    # ------------------------------------------------------------------ the step

    def lr(self) -> float:
        o = self.optim_cfg
        return self.lr_scale * lr_at(self.step, o.lr, o.warmup_steps, o.max_steps, o.min_lr_ratio)

    def autocast(self):
        """bf16 autocast where configured (weights and optimizer state stay fp32); nothing in fp32."""
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _grad_sync(self, enabled: bool):
        """Gradient all-reduce only on the last micro-batch of a step (DDP no_sync / FSDP2 switch)."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if not enabled and hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank if it is true on any. A SIGTERM or a time cap reaches ranks at
        different moments; if they disagreed on stopping, one would wait in a collective the others never
        enter. One tiny all-reduce per step (only when distributed) keeps them in step."""
        if self.world_size == 1:
            return flags
        values = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in values.tolist())

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def forward_backward(self) -> tuple[torch.Tensor, list[str], tuple[int, int] | None]:
        """Run accum_steps micro-batches, backpropagating each one's loss sum (gradients accumulate).

        Returns this rank's totals over the step packed in one tensor, [loss_sum, weight, n_tokens, *metric
        sums], the metric names, and the batch-source positions read.
        """
        accum = self.cfg.accum_steps
        start = getattr(self.batches, "step", None)
        # float64 keeps token counts exact (MPS has none: float32 there, exact to 2^24 tokens per step).
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        totals: dict[str, torch.Tensor] = {}
        self.model.train()
        for micro in range(accum):
            batch = self.batches.next_batch()
            with self._grad_sync(micro == accum - 1):
                with self.autocast():
                    out = self.objective.loss(self.model, batch)
                out.loss_sum.backward()  # outside autocast, as torch recommends
            metrics = dict(out.metrics)
            n_tokens = metrics.pop("n_tokens", None)
            parts = {"loss": out.loss_sum.detach(), "weight": out.weight,
                     "n_tokens": batch_tokens(batch) if n_tokens is None else n_tokens, **metrics}
            for k, v in parts.items():
                v = v.detach().to(self.device, dtype) if isinstance(v, torch.Tensor) else float(v)
                totals[k] = totals.get(k, 0.0) + v
        end = getattr(self.batches, "step", None)
        packed = torch.stack([torch.as_tensor(v, dtype=dtype, device=self.device) for v in totals.values()])
        batch_range = (start, end) if start is not None else None
        return packed, list(totals)[3:], batch_range

    def clip_gradients(self, scale: float = 1.0) -> float:
        """Multiply the gradients by `scale` (1 / the step's weight), clip the global norm to optim.grad_clip
        (0: no clipping) and return the pre-clip norm; one pass over the gradients for both."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        foreach = self.device.type != "mps"
        norm = torch.nn.utils.get_total_norm(grads, foreach=foreach) * scale  # a DTensor under FSDP2
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        if scale != 1.0 or max_norm < math.inf:
            # clip_grad_norm_'s rule, grads * min(1, max_norm / (norm + 1e-6)), times the scale as well.
            factor = scale * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            if foreach:
                torch._foreach_mul_(grads, factor)
            else:
                for g in grads:
                    g.mul_(factor)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def train_step(self) -> dict | None:
        """One optimizer step; returns its metrics record (None if a callback rolled back instead)."""
        t0 = time.perf_counter()
        self.objective.prepare_step(self)
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        packed, names, batch_range = self.forward_backward()
        loss_sum, weight, n_tokens, *sums = self._sum_over_ranks(packed).tolist()
        # The step's gradient is the sum of every micro-batch's and rank's loss sums over their total weight.
        grad_norm = self.clip_gradients(self._ranks_averaged / weight if weight > 0 else 0.0)
        loss = loss_sum / weight if weight > 0 else math.nan
        metrics = {k: v / weight if weight > 0 else math.nan for k, v in zip(names, sums, strict=True)}
        stats = StepStats(self.step, loss, grad_norm, lr, int(n_tokens), metrics, batch_range)

        action = Skip(reason="weight 0: nothing to learn from in this step") if weight <= 0 \
            else self._decide(stats)
        if isinstance(action, Rollback):
            self.optimizer.zero_grad(set_to_none=True)
            self.rollback(action)
            return None
        if isinstance(action, Skip):
            self._events.append({"type": "skip", "reason": action.reason})
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += stats.tokens
        dt = time.perf_counter() - t0
        tokens_per_s = self.throughput.update(stats.tokens, dt)
        clipped = 0 < self.optim_cfg.grad_clip < grad_norm
        return {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "clipped": clipped, "tokens_per_s": tokens_per_s,
                "mfu": mfu(self.flops_per_token, tokens_per_s, self._peak, self.world_size), **metrics}

    def _decide(self, stats: StepStats) -> Skip | Rollback | None:
        """Ask the callbacks; a rollback outranks a skip. Non-finite steps are skipped, then stop the run."""
        actions = [cb.before_optimizer_step(self, stats) for cb in self.callbacks]
        for kind in (Rollback, Skip):
            for a in actions:
                if isinstance(a, kind):
                    return a
        if math.isfinite(stats.loss) and math.isfinite(stats.grad_norm):
            self._nonfinite = 0
            return None
        # Applying a NaN/inf gradient would poison every weight; skipping keeps the model usable.
        self._nonfinite += 1
        if self._nonfinite >= MAX_NONFINITE:
            raise TrainingDiverged(f"loss/grad norm non-finite for {MAX_NONFINITE} steps in a row at step "
                                   f"{stats.step}; lower optim.lr or resume from an earlier checkpoint")
        return Skip(reason="non-finite loss or grad norm")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train until optim.max_steps (or should_stop); evaluate, checkpoint, log. Returns a summary."""
        from tqdm.auto import tqdm

        max_steps = self.optim_cfg.max_steps
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self._peak = peak_flops(self.device, self.amp_dtype, self.cfg.peak_flops)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        started = time.perf_counter()
        bar = tqdm(total=max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.cfg.progress and self.is_main))
        # The agreed stop; self.should_stop is only a request (see the module docstring). One process has no
        # one to agree with, so there a request stops the loop after the step it arrived in.
        stopping = self.world_size == 1 and self.should_stop
        while self.step < max_steps and not stopping:
            record = self.train_step()
            if record is None:  # rolled back: the bar follows the restored step
                bar.n = self.step
                self._write(self._event_record())
                continue
            bar.update(1)
            done = self.step >= max_steps
            time_up = bool(not done and self.cfg.max_minutes
                           and time.perf_counter() - started > 60 * self.cfg.max_minutes)
            time_up, stopping = self._agree(time_up, self.should_stop)
            if time_up:
                # A time cap ends the run like the last step would (eval + checkpoint); the LR schedule
                # is not stretched, so resuming later continues exactly where this stopped.
                self._events.append({"type": "time_limit", "minutes": self.cfg.max_minutes})
                done = stopping = True
            eval_due = bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            if done or eval_due:
                record.update(self.evaluate())
            saving = self.checkpointer is not None and (
                done or stopping or bool(self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0))
            if saving:
                self._events.append(self._checkpoint_event())
            record["events"] = self._take_events()
            if record["events"] or self.step % self.cfg.log_every == 0 or done:
                # Before the checkpoint: killed between the two, the run resumes from the previous checkpoint
                # and drops this line; the other way round it would resume from this one with the line lost.
                self._write(record)
            if saving:
                self.save(log=False)
            for cb in self.callbacks:
                cb.on_step_end(self, record)
            bar.set_postfix_str(self._postfix(record), refresh=False)
            stopping = stopping or (self.world_size == 1 and self.should_stop)
        if stopping and self._saved_step != self.step:  # the request came after this step's save point
            self.save()
            self._write(self._event_record())
        bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.cfg.plot and self.is_main and self.run_dir is not None:
            from llmlab.train.plot import plot_run

            plot_run(self.run_dir)
        return self.summary()

    def _postfix(self, record: dict) -> str:
        parts = [f"loss {record['loss']:.4f}", f"{self.throughput.ema or 0:,.0f} tok/s"]
        smoothed_mfu = mfu(self.flops_per_token, self.throughput.ema or 0, self._peak, self.world_size)
        if smoothed_mfu is not None:
            parts.append(f"mfu {100 * smoothed_mfu:.1f}%")
        metric = self.objective.best_metric
        if metric in self.last_eval:
            parts.append(f"{'val' if metric == 'val_loss' else metric} {self.last_eval[metric]:.4f}")
        return " | ".join(parts)

    def _take_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def _event_record(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "events": self._take_events()}

    def _write(self, record: dict) -> None:
        if self.metrics is not None and self.is_main:
            self.metrics.write(record)

    def summary(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "tokens_per_s": self.throughput.mean,
                "mfu": mfu(self.flops_per_token, self.throughput.mean, self._peak, self.world_size),
                "peak_flops": self._peak, **self.last_eval,
                "run_dir": str(self.run_dir) if self.run_dir else None}

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """objective.evaluate(model) in eval mode under the training autocast; logged with an eval event
        (nothing happens for an objective without held-out metrics)."""
        self.model.eval()
        try:
            with self.autocast():
                result = {k: float(v) for k, v in self.objective.evaluate(self.model).items()}
        finally:
            self.model.train()
        if not result:
            return result
        self.last_eval, self._eval_step = result, self.step
        self._events.append({"type": "eval", **result})
        return result

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything but the weights needed to continue exactly (tensors and primitives only)."""
        return {
            "step": self.step, "tokens": self.tokens, "lr_scale": self.lr_scale,
            "skipped": [list(r) for r in self.skipped],
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "objective": self.objective.state_dict(),
            "last_eval": dict(self.last_eval),
            "optim_config": dataclasses.asdict(self.optim_cfg),
        }

    def _judge_by_objective(self, checkpointer: Checkpointer) -> None:
        """The checkpointer keeps (and best.json names) the best checkpoint by the objective's metric."""
        checkpointer.best_metric = self.objective.best_metric
        checkpointer.higher_is_better = self.objective.higher_is_better

    def _best_value_now(self) -> float | None:
        """The best metric measured at this step, None if this step was not evaluated."""
        return self.last_eval.get(self.objective.best_metric) if self._eval_step == self.step else None

    def _checkpoint_event(self) -> dict:
        """The metrics event of saving ckpt-STEP now, "best" included when it will become the best."""
        event = {"type": "checkpoint", "path": self.checkpointer.path(self.step).name}
        if self.is_main and hasattr(self.checkpointer, "beats_best") and \
                self.checkpointer.beats_best(self.step, self._best_value_now()):
            event["best"] = True
        return event

    def save(self, log: bool = True) -> Path | None:
        """Write ckpt-STEP (rank 0; a distributed checkpointer overrides this policy) and, with `log`, queue
        its event (fit logs it itself, before the write: see there)."""
        if self.checkpointer is None:
            return None
        event = self._checkpoint_event()
        self._saved_step = self.step
        path = self.checkpointer.path(self.step)
        if self.is_main or getattr(self.checkpointer, "collective", False):  # DCP: every rank writes
            path = self.checkpointer.save(self.step, self.model, self.state_dict())
        if self.is_main and hasattr(self.checkpointer, "update_best"):
            self.checkpointer.update_best(self.step, self._best_value_now())
        # No rank may read this checkpoint (a rollback, or code after fit) before rank 0 has written it.
        barrier()
        if log:
            self._events.append(event)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def restore(self, path: str | Path) -> None:
        """Load weights, optimizer, batch position, RNG states and counters from a checkpoint."""
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(Path(path).parent, self.cfg.keep_last,
                                             keep_best=self.cfg.keep_best)
            self._judge_by_objective(self.checkpointer)
        state = self.checkpointer.load(path, self.model)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} has optimizer state that does not fit this model "
                                  f"({_first_line(e)}); resume with the checkpoint's model config") from e
        try:
            self._apply_state(state)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as e:
            raise CheckpointError(f"{Path(path) / 'train_state.pt'} holds a training state that cannot be "
                                  f"restored ({type(e).__name__}: {_first_line(e)}); resume from another "
                                  "checkpoint") from e

    def _apply_state(self, state: dict) -> None:
        """Batch position, RNG states, counters and callback states from a checkpoint's train_state."""
        self.batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.skipped = [(int(a), int(b)) for a, b in state.get("skipped", [])]
        self.last_eval = {k: float(v) for k, v in state.get("last_eval", {}).items()}
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
        if state.get("objective"):
            self.objective.load_state_dict(state["objective"])

    def resume(self, path: str | Path) -> None:
        """Continue a run from `path`: restore, and drop metrics records newer than the checkpoint."""
        self.restore(path)
        if self.metrics is not None and self.is_main:
            self.metrics.truncate_after(self.step)
        self._events.append({"type": "resume", "path": Path(path).name})

    def rollback(self, action: Rollback) -> Path:
        """Go back to the newest checkpoint at or before `action.to_step` and skip the bad data.

        Skipped ranges accumulate across rollbacks: restoring an old checkpoint brings back the batch
        source's old state, so every range recorded so far is applied again.
        """
        if self.checkpointer is None:
            raise CheckpointError("rollback needs checkpoints; give the Trainer a run_dir")
        barrier()  # every rank must see the same, completely written checkpoints before choosing one
        path = self.checkpointer.latest(max_step=action.to_step)
        if path is None:
            raise CheckpointError(f"no checkpoint at or before step {action.to_step} to roll back to "
                                  f"in {self.checkpointer.run_dir}; keep more (train.keep_last) or "
                                  "checkpoint more often")
        from_step, skipped = self.step, list(self.skipped)
        if action.skip is not None:
            skipped.append(tuple(int(x) for x in action.skip))
        self.restore(path)
        self.skipped = skipped
        for a, b in self.skipped:
            self.batches.skip(a, b)
        if action.lr_scale is not None:
            self.lr_scale = action.lr_scale
        self._events.append({"type": "rollback", "from_step": from_step, "to_step": self.step,
                             "skip": list(action.skip) if action.skip else None, "reason": action.reason})
        return path
