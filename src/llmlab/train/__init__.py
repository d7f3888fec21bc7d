"""Training: optimizer + LR schedule, the generic training loop, checkpoints, metrics/MFU, plots.

`Trainer` is the one loop every objective uses (an `Objective` from objective.py: its loss sum and weight,
evaluation, best metric; see trainer.py);
`run_pretrain(PretrainConfig)` wires a Transformer, a TokenLoader and the Trainer for next-token
pretraining (`llmlab pretrain`).
"""

from llmlab.train.checkpoint import Checkpointer, resolve_resume, unwrap
from llmlab.train.objective import LossOutput, NextToken, Objective
from llmlab.train.optim import OptimConfig, build_optimizer, param_groups
from llmlab.train.schedule import lr_at
from llmlab.train.trainer import Callback, Rollback, Skip, StepStats, TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "OptimConfig", "Callback", "Skip", "Rollback", "StepStats",
           "Objective", "LossOutput", "NextToken", "Checkpointer",
           "resolve_resume", "unwrap", "build_optimizer", "param_groups", "lr_at", "PretrainConfig",
           "run_pretrain"]


def __getattr__(name: str):
    # Pretraining pulls in the model and data packages; import it only when asked for.
    if name in ("PretrainConfig", "run_pretrain"):
        from llmlab.train import pretrain

        return getattr(pretrain, name)
    raise AttributeError(f"module 'llmlab.train' has no attribute {name!r}")
