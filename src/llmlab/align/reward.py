"""Reward model: a scalar head on an SFT backbone, trained on preference pairs with the Bradley-Terry loss.

    llmlab reward train --checkpoint runs/sft/ckpt-000300 --data prefs_train.jsonl train.run_name=rm
    llmlab reward score runs/rm/ckpt-000200 --data completions.jsonl --out scored.jsonl

The backbone is the SFT checkpoint's Transformer (dropout off, as in TRL's trainers); its LM head is
replaced by a fresh Linear(d_model, 1) (`ModelConfig.head = "scalar"`, so the checkpoint records it and
loads back with one call). The reward of a sequence is the head's output at its last non-pad token, the
end-of-turn token that closes the answer, which has attended to the whole conversation (TRL's
AutoModelForSequenceClassification reads the same place).

Loss per pair (llmlab.align.losses.bradley_terry_loss): -log sigmoid(r_chosen - r_rejected - margin), plus
center * (r_chosen + r_rejected)^2 with reward.center_coefficient; `margin` comes from a record's "margin"
field when the data has one (TRL's convention). The objective returns the SUM over the micro-batch's pairs
with weight = pairs. Logged per step (means over pairs): accuracy ([r_c > r_r]), margin (r_c - r_r),
rewards/chosen, rewards/rejected. Held-out: val_loss, val_accuracy, val_margin on data.val (or a
data.val_fraction of the training pairs held back); the best checkpoint is the one with the highest
val_accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.align.losses import bradley_terry_loss, reward_metrics
from llmlab.align.pairs import (
    PairBatches,
    PairDataConfig,
    last_token_values,
    load_start,
    pair_batches,
    resolve_pair_config,
)
from llmlab.config import NonNegativeFloat, PositiveFloat, check_config
from llmlab.data.chat_data import encode_preference, encode_sft, iter_records, parse_preference, parse_sft
from llmlab.device import resolve_device
from llmlab.errors import CheckpointError, DataError
from llmlab.fsutil import check_output, write_text_atomic
from llmlab.model import Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.chat import with_chat_tokens
from llmlab.train.checkpoint import unwrap
from llmlab.train.distributed import ParallelConfig
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.objective import LossOutput, Objective
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig


@dataclass
class RewardSettings:
    center_coefficient: NonNegativeFloat = 0.0  # TRL's center_rewards_coefficient (0: off; they suggest 1e-2)
    head_lr_mult: PositiveFloat = 1.0           # the fresh scalar head's LR, as a multiple of optim.lr


@dataclass
class RewardConfig:
    checkpoint: str = ""           # the backbone: an SFT checkpoint (or any ckpt-STEP / import-hf directory)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=10,
                                                                   max_steps=300))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="reward", eval_every=50,
                                                                   ckpt_every=100))
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def sequence_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """[2B]: the scalar head's output at each sequence's last token."""
    extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    scores = model(batch["input_ids"], output="scores", **extra)
    return last_token_values(scores.float(), batch)


def pair_rewards(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B])."""
    return sequence_scores(model, batch).chunk(2)


class RewardObjective(Objective):
    """Bradley-Terry on pairs: loss sum over pairs, weight = pairs; best checkpoint by held-out accuracy."""

    name = "reward"
    best_metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, val: PairBatches | None = None, center_coefficient: float = 0.0,
                 head_lr_mult: float = 1.0, max_batches: int | None = None):
        self.val, self.center = val, center_coefficient
        self.head_lr_mult, self.max_batches = head_lr_mult, max_batches

    def _pair_losses(self, model: nn.Module, batch: dict):
        r_chosen, r_rejected = pair_rewards(model, batch)
        losses = bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"), self.center)
        return losses, r_chosen, r_rejected

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        losses, r_chosen, r_rejected = self._pair_losses(model, batch)
        metrics = {k: v.sum() for k, v in reward_metrics(r_chosen, r_rejected).items()}
        metrics["rewards/chosen"] = r_chosen.detach().sum()
        metrics["rewards/rejected"] = r_rejected.detach().sum()
        metrics["n_tokens"] = int(batch["lengths"].sum())
        return LossOutput(losses.sum(), batch["n_pairs"], metrics)

    def param_groups(self, module: nn.Module) -> list[dict] | None:
        if self.head_lr_mult == 1.0:
            return None
        return [{"params": list(unwrap(module).score.parameters()), "lr_mult": self.head_lr_mult}]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        total, pairs = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, 0
        for index, batch in self.val.iter_all(self.max_batches):
            losses, r_chosen, r_rejected = self._pair_losses(model, batch)
            total["loss"] += float(losses.sum())
            for k, v in reward_metrics(r_chosen, r_rejected).items():
                total[k] += float(v.sum())
            pairs += len(index)
        return {f"val_{k}": v / pairs for k, v in total.items()}


def reward_objective(val: PairBatches | None = None, center_coefficient: float = 0.0,
                     head_lr_mult: float = 1.0, max_batches: int | None = None) -> RewardObjective:
    """The reward-model objective for llmlab.train's Trainer: held-out metrics over `val` (at most
    max_batches of its batches) when given; the scalar head's LR times head_lr_mult."""
    return RewardObjective(val, center_coefficient, head_lr_mult, max_batches)


def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                    device: torch.device | str = "cpu") -> list[float]:
    """The reward of each token sequence (read at its last token), in order."""
    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            scores = model(ids.to(device), output="scores").float()
            last = torch.tensor([len(s) - 1 for s in chunk], device=scores.device)
            out += scores[torch.arange(len(chunk), device=scores.device), last].tolist()
    return out


def with_scalar_head(model: Transformer) -> Transformer:
    """A reward model from `model`: the same backbone weights, the LM head replaced by a fresh scalar head
    (a model that already has one is returned as it is)."""
    if model.config.head == "scalar":
        return model
    device = next(model.parameters()).device
    reward = Transformer(dataclasses.replace(model.config, head="scalar")).to(device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = reward.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("score.") for k in missing), (missing, unexpected)
    return reward


def run_reward(cfg: RewardConfig, resume: str | None = None, say=None) -> dict[str, Any]:
    """Train a reward model per `cfg` on the shared launcher (resume: a checkpoint, a run dir, "auto" or
    "best"); returns the run's summary. `say(line)` receives the one-line notes."""
    cfg = check_config(cfg)  # bad values are reported before anything runs

    def resolve(cfg: RewardConfig) -> Plan:
        cfg = resolve_pair_config(cfg)
        return Plan(cfg, inputs=[cfg.checkpoint, cfg.data.train, cfg.data.val, cfg.data.tokenizer])

    def build(run: Run) -> Built:
        cfg, d = run.config, run.config.data
        notes = (lambda line: say(f"llmlab reward train: {line}")) if say and run.rank == 0 else None
        backbone, tok, data = load_start(cfg, run.device, notes)
        model = with_scalar_head(backbone)
        pad = tok.chat_template.pad_id
        batches = pair_batches(data.train, d, pad, run.rank, run.world_size, run.device, data.train_margin)
        val = pair_batches(data.val, d, pad, device=run.device, margin=data.val_margin, shuffle=False) \
            if data.val else None
        objective = reward_objective(val, cfg.reward.center_coefficient, cfg.reward.head_lr_mult,
                                     cfg.train.eval_batches)
        summary = {"pairs": len(data.train), "val_pairs": len(data.val), "dropped": data.dropped}
        return Built(model, objective, batches, flops_per_token=model.flops_per_token(d.block_size),
                     tokenizer=tok, summary=summary)

    return launch(cfg, build, resume, resolve=resolve)


# ----- llmlab reward score -----
def _sequences(tok, where: str, record: dict) -> dict[str, list[int]]:
    """The token sequences of one record to score, by output field: a preference record gives
    score_chosen and score_rejected, a conversation ({"messages"} or {"prompt", "completion"}) gives score."""
    if "chosen" in record or "rejected" in record:
        prompt, chosen, rejected = encode_preference(tok, parse_preference(record, where))
        return {"score_chosen": prompt + chosen, "score_rejected": prompt + rejected}
    ids, _ = encode_sft(tok, parse_sft(record, where))
    return {"score": ids}


def score_file(checkpoint: str | Path, data: str | Path, out: str | Path, batch_size: int = 16,
               device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """`llmlab reward score`: every record of DATA (JSONL/Parquet) with its reward added, written to OUT as
    JSONL (atomically). Returns {"records", "out", "mean_score"}."""
    check_output(out, inputs=[checkpoint, data], overwrite=overwrite)
    dev = resolve_device(device)
    model = Transformer.load(checkpoint, device=dev)
    if model.config.head != "scalar":
        raise CheckpointError(f"checkpoint {checkpoint} has an LM head (head={model.config.head!r}), not a "
                              "reward model's scalar head; score with a checkpoint of `llmlab reward train`")
    tok_dir = Path(checkpoint) / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no tokenizer/ directory; score with a checkpoint "
                              "written by `llmlab reward train`")
    tok, _ = with_chat_tokens(Tokenizer.load(tok_dir))
    records, fields, sequences = [], [], []
    for where, record in iter_records(data):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; fix that record")
        seqs = _sequences(tok, where, record)
        for ids in seqs.values():
            if len(ids) > model.config.block_size:
                raise DataError(f"{where}: {len(ids)} tokens, longer than the model's context "
                                f"({model.config.block_size}); shorten that record")
        records.append(record)
        fields.append(list(seqs))
        sequences += list(seqs.values())
    if not records:
        raise DataError(f"{data} holds no records; add conversations or preference pairs")
    scores = iter(score_sequences(model, sequences, batch_size, dev))
    lines, total = [], []
    for record, names in zip(records, fields, strict=True):
        values = {name: next(scores) for name in names}
        total += values.values()
        lines.append(json.dumps({**record, **values}, ensure_ascii=False))
    write_text_atomic(Path(out), "\n".join(lines) + "\n")
    return {"records": len(records), "out": str(out), "mean_score": sum(total) / len(total)}
