"""Knowledge distillation: pretrain a small model on a bigger one's predicted distributions.

    llmlab pretrain --config configs/cpu-demo.toml model.n_layer=1 model.d_model=128 model.n_head=2 \\
        distill.teacher=runs/big/ckpt-000700 distill.weight=0.9

Each step the frozen teacher reads the same batch and the student minimises

    loss = (1 - weight) * CE(student, data)
           + weight * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

(Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"; tau^2 keeps the KL's gradient
on the scale of the cross-entropy's when tau > 1). The main use here is a draft model for speculative
decoding: what makes a draft fast is agreeing with its target, and a draft trained towards the target's
distributions accepts more of its guesses than one trained on the data alone (Zhou et al. 2023,
"DistillSpec: Improving Speculative Decoding via Knowledge Distillation"). The paper also found training on
model-generated text better than on a fixed dataset: `llmlab data generate` writes shards of the target's
own continuations, and `distill.teacher` works on them like on any others (measured agreement:
docs/performance.md).

The teacher must read the same tokens: its vocabulary size must equal the shards', and when both the
teacher checkpoint and the shards carry a tokenizer, the two must map every id to the same bytes. Logged
per step: `ce` (against the data) and `kl` (to the teacher, at tau); val_loss stays the plain cross-entropy,
so runs with and without a teacher compare directly. Memory: the student's and the teacher's logits for
a micro-batch are materialised ([batch, block, vocab] each), so lower data.batch_size for big vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.config import Fraction, PositiveFloat
from llmlab.errors import ConfigError
from llmlab.model import Transformer
from llmlab.tokenizer.identity import TokenizerId, checkpoint_tokenizer, require_same_tokenizer
from llmlab.train.objective import LossOutput, Objective


@dataclass
class DistillConfig:
    teacher: str | None = None   # checkpoint directory of the teacher; None = plain pretraining
    weight: Fraction = 1.0       # share of the KL term; the rest stays on cross-entropy with the data
    temperature: PositiveFloat = 1.0  # tau: > 1 softens both distributions


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)) in fp32: the mean over tokens
    ("batchmean") or their sum ("sum")."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction=reduction) * temperature ** 2


class Distillation(Objective):
    """The loss above, summed over tokens and weighted by their count; the teacher runs without gradients.
    Metrics "ce" and "kl" per token; evaluate is `eval_fn` (plain cross-entropy for pretraining)."""

    name = "distill"

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float,
                 eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None):
        self.teacher, self.weight, self.temperature, self.eval_fn = teacher, weight, temperature, eval_fn

    def loss(self, model: torch.nn.Module, batch) -> LossOutput:
        x, y = batch
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        ce = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="sum")
        kl = kl_to_teacher(logits, teacher_logits, self.temperature, reduction="sum")
        loss = (1 - self.weight) * ce + self.weight * kl
        return LossOutput(loss, y.numel(), {"ce": ce.detach(), "kl": kl.detach(), "n_tokens": x.numel()})

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.eval_fn(model) if self.eval_fn is not None else {}


def load_teacher(cfg: DistillConfig, vocab_size: int, block_size: int, data: TokenizerId,
                 device: torch.device) -> torch.nn.Module:
    """The frozen teacher, checked against the training data and its tokenizer `data` (one line each)."""
    path = Path(cfg.teacher)
    if not (path / "config.json").is_file():
        raise ConfigError(f"distill.teacher={cfg.teacher} is not a checkpoint directory (no config.json); "
                          "point it at a ckpt-STEP directory of a trained model")
    teacher = Transformer.load(path, device=device)
    if teacher.config.vocab_size != vocab_size:
        raise ConfigError(f"distill.teacher has a {teacher.config.vocab_size}-token vocabulary but the "
                          f"shards have {vocab_size}; distil from a teacher trained with the shards' "
                          "tokenizer")
    if teacher.config.block_size < block_size:
        raise ConfigError(f"distill.teacher's context ({teacher.config.block_size}) is shorter than "
                          f"data.block_size={block_size}; lower data.block_size")
    require_same_tokenizer(data, checkpoint_tokenizer(path, teacher.config.vocab_size),
                           "distil from a teacher trained with the shards' tokenizer")
    return teacher.eval().requires_grad_(False)
