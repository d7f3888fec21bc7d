"""DPO: train a policy directly on preference pairs against a frozen reference (Rafailov et al. 2023).

    llmlab dpo --checkpoint runs/sft/ckpt-000300 --data prefs_train.jsonl train.run_name=dpo dpo.beta=0.1
    llmlab dpo --checkpoint runs/sft/ckpt-000300 --data prefs.jsonl dpo.loss_type=ipo lora.rank=8

The policy starts from the checkpoint, and so does the reference (dropout off for both, as in TRL). Per
pair the objective needs the summed log-probabilities of the chosen and rejected completions (the prompt's
tokens excluded) under both; the losses (sigmoid, IPO, label smoothing = conservative DPO) and TRL's metrics
are llmlab.align.losses'.

Reference log-probs. By default (dpo.reference = "precomputed") they are computed once, before training, for
every training and held-out pair, and stored with the pairs (PairBatches extras), so each step runs the
policy alone. They are always computed from the starting weights, never from a resumed checkpoint, so a
resumed run uses exactly the numbers the original did. dpo.reference = "live" instead runs the reference
on each batch: a frozen copy of the starting model, or, with LoRA, the policy itself with its adapters
switched off (llmlab.align.lora.adapters_disabled), which needs no second copy of the weights.

The objective returns the SUM of per-pair losses with weight = pairs. Logged per step (means over pairs):
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected;
held-out: the same with a val_ prefix and val_loss. The best checkpoint has the highest
val_rewards/margins: the held-out margin by which the policy prefers chosen over rejected answers, relative
to the reference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from llmlab.align.lora import LoRACheckpointer, LoRAConfig, apply_lora
from llmlab.align.losses import DPOLossType, dpo_loss, dpo_metrics
from llmlab.align.pairs import (
    PairBatches,
    PairDataConfig,
    completion_lengths,
    completion_logps,
    load_start,
    pair_batches,
    resolve_pair_config,
)
from llmlab.align.sft import load_tokenizer, refuse_lora_with_fsdp, write_merged
from llmlab.config import PositiveFloat, Range, check_config
from llmlab.device import resolve_dtype
from llmlab.errors import ConfigError
from llmlab.model.transformer import read_config
from llmlab.train.distributed import ParallelConfig
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.objective import LossOutput, Objective
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig

REF_KEYS = ("ref_chosen", "ref_rejected")
IGNORE = -100


@dataclass
class DPOSettings:
    beta: PositiveFloat = 0.1      # strength of the pull towards the reference (IPO: the tau of the paper)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0  # sigmoid: conservative DPO's flip rate
    reference: Literal["precomputed", "live"] = "precomputed"  # log-probs once up front, or every step


@dataclass
class DPOConfig:
    checkpoint: str = ""           # the policy's start and the reference: an SFT checkpoint
    data: PairDataConfig = field(default_factory=PairDataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=10,
                                                                   max_steps=300))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="dpo", eval_every=50,
                                                                   ckpt_every=100))
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def sequence_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """[2B]: each sequence's summed log-probability of its completion tokens given what precedes them."""
    ids = batch["input_ids"]
    extra = {"segment_ids": batch["segment_ids"][:, :-1]} if "segment_ids" in batch else {}
    # Only completion targets count; the others are marked ignored (their log-probs come back 0).
    targets = ids[:, 1:].masked_fill(batch["owner"] == 2 * batch["n_pairs"], IGNORE)
    per_token = model(ids[:, :-1], targets=targets, output="logprobs", **extra)
    return completion_logps(per_token.float(), batch)


@torch.no_grad()
def reference_logps(reference: Callable[[dict], torch.Tensor], pairs: PairBatches) -> dict[str, torch.Tensor]:
    """{"ref_chosen": [N], "ref_rejected": [N]} for every pair, in pair order (on the CPU)."""
    n = len(pairs)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    for index, batch in pairs.iter_all():
        c, r = reference(batch).float().cpu().chunk(2)
        chosen[index], rejected[index] = c, r
    return {"ref_chosen": chosen, "ref_rejected": rejected}


def frozen_reference(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    """The reference as a function of a batch: `model` in eval mode, without gradients."""

    @torch.no_grad()
    def run(batch: dict) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            return sequence_logps(model, batch)
        finally:
            model.train(was)

    return run


def adapter_free_reference(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    """With LoRA: the policy itself with every adapter off is the starting model, the reference."""
    from llmlab.align.lora import adapters_disabled

    run = frozen_reference(model)

    def without_adapters(batch: dict) -> torch.Tensor:
        with adapters_disabled(model):
            return run(batch)

    return without_adapters


class DPOObjective(Objective):
    """DPO on pairs: loss sum over pairs, weight = pairs; best checkpoint by held-out reward margin."""

    name = "dpo"
    best_metric = "val_rewards/margins"
    higher_is_better = True

    def __init__(self, beta: float = 0.1, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
                 reference: Callable[[dict], torch.Tensor] | None = None, val: PairBatches | None = None,
                 max_batches: int | None = None):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference, self.val, self.max_batches = reference, val, max_batches

    def _reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if REF_KEYS[0] in batch:
            return batch[REF_KEYS[0]], batch[REF_KEYS[1]]
        if self.reference is None:
            raise ValueError("the batch carries no reference log-probs and the objective has no reference")
        return self.reference(batch).chunk(2)

    def _pairs(self, model: nn.Module, batch: dict):
        policy_chosen, policy_rejected = sequence_logps(model, batch).chunk(2)
        ref_chosen, ref_rejected = self._reference(batch)
        lengths = completion_lengths(batch).chunk(2)
        losses = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                          loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                          chosen_lengths=lengths[0], rejected_lengths=lengths[1])
        metrics = dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        return losses, metrics

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        losses, metrics = self._pairs(model, batch)
        sums = {k: v.sum() for k, v in metrics.items()}
        sums["n_tokens"] = int(batch["lengths"].sum())
        return LossOutput(losses.sum(), batch["n_pairs"], sums)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        total: dict[str, float] = {}
        pairs = 0
        for index, batch in self.val.iter_all(self.max_batches):
            losses, metrics = self._pairs(model, batch)
            for k, v in {"loss": losses, **metrics}.items():
                total[k] = total.get(k, 0.0) + float(v.sum())
            pairs += len(index)
        return {f"val_{k}": v / pairs for k, v in total.items()}


def dpo_objective(beta: float = 0.1, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
                  reference: Callable[[dict], torch.Tensor] | None = None, val: PairBatches | None = None,
                  max_batches: int | None = None) -> DPOObjective:
    """The DPO objective for llmlab.train's Trainer. Batches carry the reference log-probs ("ref_chosen",
    "ref_rejected", see reference_logps), or `reference(batch) -> [2B]` computes them live; held-out metrics
    over `val` (at most max_batches of its batches) when given."""
    return DPOObjective(beta, loss_type, label_smoothing, reference, val, max_batches)


def _autocast(dtype: torch.dtype, device: torch.device):
    """The trainer's autocast, so reference log-probs are computed in the precision the policy's are."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_config(cfg: DPOConfig) -> DPOConfig:
    """Check every value and fill data.block_size from the checkpoint; nothing is written."""
    cfg = resolve_pair_config(cfg)
    head = read_config(Path(cfg.checkpoint)).head
    if head != "lm":
        raise ConfigError(f"checkpoint {cfg.checkpoint} has head={head!r} (a reward or value model); DPO "
                          "trains a language model: pass --checkpoint an SFT checkpoint")
    refuse_lora_with_fsdp(cfg)
    if cfg.dpo.label_smoothing and cfg.dpo.loss_type != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing={cfg.dpo.label_smoothing} applies to the sigmoid loss only; "
                          f"set dpo.label_smoothing=0 with dpo.loss_type={cfg.dpo.loss_type}")
    return cfg


def run_dpo(cfg: DPOConfig, resume: str | None = None, say=None) -> dict[str, Any]:
    """Train a policy with DPO per `cfg` on the shared launcher (resume: a checkpoint, a run dir, "auto" or
    "best"); returns the run's summary. `say(line)` receives the one-line notes."""
    cfg = check_config(cfg)  # bad values are reported before anything runs

    def resolve(cfg: DPOConfig) -> Plan:
        cfg = resolve_config(cfg)
        return Plan(cfg, inputs=[cfg.checkpoint, cfg.data.train, cfg.data.val, cfg.data.tokenizer])

    def build(run: Run) -> Built:
        cfg, d, o = run.config, run.config.data, run.config.dpo
        notes = (lambda line: say(f"llmlab dpo: {line}")) if say and run.rank == 0 else None
        model, tok, data = load_start(cfg, run.device, notes)
        pad = tok.chat_template.pad_id
        batches = pair_batches(data.train, d, pad, run.rank, run.world_size, run.device)
        val = pair_batches(data.val, d, pad, device=run.device, shuffle=False) if data.val else None
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora)
            reference = adapter_free_reference(model)
        else:  # the starting weights: `model` itself until training changes it, then a frozen copy
            reference = frozen_reference(model if o.reference == "precomputed" else
                                         copy.deepcopy(model).requires_grad_(False))
        # Built before any checkpoint is restored (launch resumes after build), so these are always the
        # starting weights' log-probs, whether the run is fresh or resumed.
        with _autocast(resolve_dtype(cfg.train.dtype, run.device), run.device):
            for pairs in (batches, val) if o.reference == "precomputed" else (val,):
                if pairs is not None:
                    pairs.extras.update(reference_logps(reference, pairs))
        objective = dpo_objective(o.beta, o.loss_type, o.label_smoothing,
                                  reference if o.reference == "live" else None, val, cfg.train.eval_batches)
        summary = {"pairs": len(data.train), "val_pairs": len(data.val), "dropped": data.dropped}
        checkpointer, finish = None, None
        if cfg.lora.enabled:
            checkpointer = functools.partial(LoRACheckpointer, base=cfg.checkpoint)
            if cfg.lora.merge:
                base_tok = load_tokenizer(cfg)

                def finish(trainer, summary):
                    if trainer.is_main:
                        final = trainer.checkpointer.path(trainer.step)
                        summary["merged"] = str(write_merged(run.run_dir, final, base_tok, tok))
        return Built(model, objective, batches, flops_per_token=model.flops_per_token(d.block_size),
                     tokenizer=tok, checkpointer=checkpointer, summary=summary, finish=finish)

    return launch(cfg, build, resume, resolve=resolve)
