"""The one launcher every training entry point runs on: pretrain, sft, reward, dpo, ppo.

An entry point says what is particular to it, its config, its data and its objective; `launch` does the
rest the same way for all of them: the process group (torchrun), config resolution inside it, the
run-directory checks (llmlab.fsutil.check_output, and never mixing a fresh run into an old one), the device,
seeding, parallelize (DDP/FSDP2, compile, activation checkpointing), the checkpointer (DCP under FSDP, the
tokenizer copied into every checkpoint), the spike guard, resume, SIGTERM/SIGINT (checkpoint and return),
config.toml and summary.json.

    launch(cfg, build, resume=None, *, resolve=None) -> summary (also RUN_DIR/summary.json)

    cfg          the checked config: .train (TrainConfig), .optim (OptimConfig), .parallel (ParallelConfig),
                 .spike (SpikeConfig); cfg.train.device picks the process group's backend
    resolve      cfg -> Plan(config, inputs=(), check_resume=None), run inside the process group (world()
                 is known) before anything is written: the resolved config (saved as config.toml), the
                 paths the run reads (the run directory must not be inside one), and a check that refuses a
                 checkpoint this run cannot continue. None: Plan(cfg).
    build        Run -> Built, called seeded after the run-directory checks. Run(config, device, rank,
                 world_size, run_dir, resume_path); Built(model, objective, batches, flops_per_token=None,
                 tokenizer=None, callbacks=(), checkpointer=None, summary={}, finish=None): the bare model
                 on run.device (launch parallelizes it), the Objective, the batch source, and optionally the
                 tokenizer to copy into checkpoints (a Tokenizer or a TokenizerId with a directory), extra
                 callbacks, a Checkpointer factory, summary entries, and finish(trainer, summary) after fit.
    resume       None | "auto" | "best" | a checkpoint or run directory (checkpoint.resolve_resume)

An objective's entry point (SFT, say) is then its config, its data and its objective:

    def run_sft(cfg: SFTConfig, resume: str | None = None) -> dict:
        cfg = check_config(cfg)                   # bad values are reported before anything runs

        def resolve(cfg: SFTConfig) -> Plan:
            return Plan(resolve_config(cfg), inputs=[cfg.checkpoint, cfg.data.train, cfg.data.val])

        def build(run: Run) -> Built:
            model = Transformer.load(run.config.checkpoint, device=run.device, dtype="fp32")
            batches = SFTBatches(rows, rank=run.rank, world_size=run.world_size, device=run.device)
            return Built(model, SFTObjective(eval_set), batches, tokenizer=tok)

        return launch(cfg, build, resume, resolve=resolve)
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmlab.config import to_toml
from llmlab.device import resolve_device
from llmlab.errors import ConfigError
from llmlab.fsutil import check_output, write_text_atomic
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import TokenizerId, fingerprint
from llmlab.train.checkpoint import BEST_FILE, Checkpointer, resolve_resume
from llmlab.train.distributed import (
    DistCheckpointer,
    is_dcp_checkpoint,
    parallelize,
    process_group,
    stop_on_signals,
    world,
)
from llmlab.train.objective import Objective
from llmlab.train.spike import SpikeGuard
from llmlab.train.trainer import Callback, Trainer


@dataclass
class Plan:
    """What a run is, known once its config is resolved (see the module docstring)."""

    config: Any                                 # resolved; .train .optim .parallel .spike
    inputs: Sequence[str | Path | None] = ()    # paths the run reads; the run directory stays out of them
    check_resume: Callable[[Path], None] | None = None  # refuse a checkpoint this run cannot continue


@dataclass
class Run:
    """What `build` gets."""

    config: Any
    device: torch.device
    rank: int
    world_size: int
    run_dir: Path
    resume_path: Path | None  # the checkpoint to continue from (launch loads it after build)


@dataclass
class Built:
    """What `build` returns."""

    model: nn.Module                      # bare, on run.device: launch parallelizes it
    objective: Objective
    batches: Any                          # next_batch(), state_dict(), load_state_dict() (skip(a, b))
    flops_per_token: float | None = None  # None: model.flops_per_token() at its block size
    tokenizer: Tokenizer | TokenizerId | None = None  # copied into every checkpoint
    callbacks: Sequence[Callback] = ()    # besides the spike guard (config.spike)
    checkpointer: Callable[..., Checkpointer] | None = None  # a Checkpointer class or factory taking
                                          # (run_dir, keep_last, tokenizer_dir, keep_best, fingerprint)
    summary: dict[str, Any] = field(default_factory=dict)  # more entries for summary.json
    finish: Callable[[Trainer, dict], None] | None = None  # after fit, before summary.json (every rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a fresh run into an old one unless asked; with overwrite, remove what a run writes."""
    if resuming or not run_dir.exists():
        return
    old = [p for p in run_dir.iterdir() if p.name.startswith("ckpt-") or p.name == "metrics.jsonl"]
    if not old:
        return
    if not overwrite:
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume auto to continue it, "
                          "train.overwrite=true to start over, or another train.run_name")
    for p in old + [run_dir / name for name in ("plots", "summary.json", BEST_FILE, "tensorboard")]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def launch(cfg: Any, build: Callable[[Run], Built], resume: str | Path | None = None, *,
           resolve: Callable[[Any], Plan] | None = None) -> dict[str, Any]:
    """Run one training job (module docstring); returns its summary, also written to RUN_DIR/summary.json.

    The process group is started from cfg.train.device; `resolve(cfg)` then runs inside it.
    """
    with process_group(cfg.train.device) as dist_device:
        plan = resolve(cfg) if resolve is not None else Plan(cfg)
        return _launch(plan, build, resume, dist_device)


def _launch(plan: Plan, build: Callable[[Run], Built], resume: str | Path | None,
            dist_device: torch.device | None) -> dict[str, Any]:
    cfg = plan.config
    train = cfg.train
    device = dist_device or resolve_device(train.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    rank, world_size = world()
    run_dir = Path(train.out_dir) / train.run_name
    # Never inside what the run reads; whether an existing run may be replaced: prepare_run_dir.
    check_output(run_dir, inputs=plan.inputs, overwrite=True, into=True, kept=True, what="run directory")
    resume_path = resolve_resume(resume, run_dir)
    if resume_path is None and not (train.overwrite or resume == "auto"):
        prepare_run_dir(run_dir, resuming=False, overwrite=False)  # refuse an old run before any work
    if resume_path is not None and plan.check_resume is not None:
        plan.check_resume(resume_path)

    seed_everything(train.seed)
    built = build(Run(cfg, device, rank, world_size, run_dir, resume_path))
    wrapped = parallelize(built.model, cfg.parallel, device)
    with _tokenizer_dir(built.tokenizer) as (tokenizer_dir, tokenizer_fingerprint):
        trainer = _trainer(plan, built, wrapped, run_dir, resume_path, tokenizer_dir, tokenizer_fingerprint)
        if resume_path is not None:
            trainer.resume(resume_path)  # CheckpointError if it is incomplete or does not fit the model
        elif rank == 0:
            # `--resume auto` that found no checkpoint starts over: only a run killed before its first save
            # is lost.
            prepare_run_dir(run_dir, resuming=False, overwrite=train.overwrite or resume == "auto")
        summary = _fit(trainer, cfg, run_dir, rank)
        summary.update(_summary(built, trainer, cfg, device))
        if built.finish is not None:
            built.finish(trainer, summary)
    if rank == 0:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _tokenizer_dir(tokenizer: Tokenizer | TokenizerId | None):
    """(directory, fingerprint) of the tokenizer to copy into checkpoints; a Tokenizer object is saved to a
    temporary directory that lives as long as the run."""
    if tokenizer is None:
        yield None, None
    elif isinstance(tokenizer, TokenizerId):
        yield tokenizer.directory, tokenizer.fingerprint
    else:
        with tempfile.TemporaryDirectory(prefix="llmlab-tokenizer-") as tmp:
            tokenizer.save(Path(tmp) / "tokenizer")
            yield Path(tmp) / "tokenizer", fingerprint(tokenizer)


def _trainer(plan: Plan, built: Built, wrapped: nn.Module, run_dir: Path, resume_path: Path | None,
             tokenizer_dir: Path | None, tokenizer_fingerprint: str | None) -> Trainer:
    """The Trainer with its checkpointer (DCP under FSDP or to resume a DCP checkpoint) and callbacks."""
    cfg = plan.config
    _, world_size = world()
    dcp = cfg.parallel.resolved_strategy(world_size) == "fsdp" or (
        resume_path is not None and is_dcp_checkpoint(resume_path))
    make = built.checkpointer or (DistCheckpointer if dcp else Checkpointer)
    checkpointer = make(run_dir, cfg.train.keep_last, tokenizer_dir, cfg.train.keep_best,
                        tokenizer_fingerprint)
    callbacks = ([SpikeGuard(cfg.spike)] if cfg.spike.enabled else []) + list(built.callbacks)
    trainer = Trainer(wrapped, built.objective, built.batches, cfg.optim, cfg.train, run_dir=run_dir,
                      flops_per_token=built.flops_per_token, checkpointer=checkpointer, callbacks=callbacks)
    if isinstance(checkpointer, DistCheckpointer):
        checkpointer.attach(trainer.optimizer)
    return trainer


def _fit(trainer: Trainer, cfg: Any, run_dir: Path, rank: int) -> dict[str, Any]:
    """config.toml, then fit with signals turned into a checkpoint-and-return; a run that fails before its
    first metrics line leaves no run directory behind."""
    fresh = not run_dir.exists()
    if rank == 0:
        write_text_atomic(run_dir / "config.toml", to_toml(cfg))
    try:
        with stop_on_signals(trainer):  # SIGTERM/SIGINT: checkpoint after this step, then return
            return trainer.fit()
    except BaseException:
        if fresh and rank == 0 and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _summary(built: Built, trainer: Trainer, cfg: Any, device: torch.device) -> dict[str, Any]:
    model = built.model
    counts = {}
    if hasattr(model, "num_params"):
        counts = {"params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**counts, "trainable_params": trainable, "flops_per_token": trainer.flops_per_token,
            "accum_steps": cfg.train.accum_steps, "objective": built.objective.name,
            "best_metric": built.objective.best_metric,
            "checkpoint": str(trainer.checkpointer.path(trainer.step)), "device": str(device),
            **built.summary}
