"""Post-training objectives on the one trainer (llmlab.train): SFT, reward modelling, DPO, and LoRA adapters.

Each objective is a loss + its data + the metric that picks the best checkpoint; the loop, checkpoints,
resume and parallelism are train/'s.
"""

from llmlab.align.dpo import dpo_objective
from llmlab.align.reward import reward_objective
from llmlab.align.sft import sft_objective

__all__ = ["dpo_objective", "reward_objective", "sft_objective"]
