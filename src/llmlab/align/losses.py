"""Pairwise preference losses and their metrics, as pure functions of per-pair numbers.

Every function takes 1-d tensors with one entry per preference pair and returns one loss per pair, so an
objective sums them and reports the number of pairs as the weight (the trainer divides once per step).
The formulas, names and conventions are TRL's, so a run here and a TRL run on the same numbers agree:

Bradley-Terry reward modelling (TRL RewardTrainer), rewards r from a scalar head:
    loss = -log sigmoid(r_chosen - r_rejected - margin) + center * (r_chosen + r_rejected)^2
The centering term (TRL's center_rewards_coefficient; Eisenstein et al. 2023) pins the reward's free
offset near zero, which the pairwise loss alone leaves undetermined.

DPO (TRL DPOTrainer), from summed completion log-probs of the policy (pi) and the reference (ref):
    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   Rafailov et al. 2023; eps > 0 is
             conservative DPO (Mitchell 2023): the label is taken as flipped with probability eps
    ipo      (h / n - 1 / (2 beta))^2                                    Azar et al. 2023, eq. 17 (beta is
             their tau); n: TRL divides each log-ratio by its completion's token count before differencing,
             which the IPO authors confirmed is what their results use; without lengths, n = 1
Metrics (sums over pairs; the trainer logs sum / pairs): rewards/chosen = beta (log pi - log ref)(y_c),
rewards/rejected likewise, rewards/accuracies = [reward_c > reward_r], rewards/margins = their difference,
logps/chosen and logps/rejected = the policy's summed log-probs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError

DPOLossType = Literal["sigmoid", "ipo"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(r_c - r_r - margin) (+ center_coefficient * (r_c + r_r)^2)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen.float() + r_rejected.float()) ** 2
    return loss


def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair accuracy ([r_c > r_r], ties count as wrong) and margin (r_c - r_r), TRL's names."""
    diff = (r_chosen.float() - r_rejected.float()).detach()
    return {"accuracy": (diff > 0).float(), "margin": diff}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss from summed completion log-probs (see the module docstring for each form).

    label_smoothing applies to the sigmoid form; the lengths (completion tokens) only to IPO.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    if loss_type == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    if loss_type == "ipo":
        if chosen_lengths is not None:
            chosen_ratio = chosen_ratio / chosen_lengths.float().clamp(min=1)
        if rejected_lengths is not None:
            rejected_ratio = rejected_ratio / rejected_lengths.float().clamp(min=1)
        return (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    raise ConfigError(f"dpo.loss_type={loss_type!r} is not a DPO loss; use one of "
                      f"{', '.join(DPO_LOSS_TYPES)}")


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair values of TRL's DPO metrics (rewards/chosen, ..., logps/rejected), detached."""
    chosen_reward = beta * (policy_chosen.float() - ref_chosen.float()).detach()
    rejected_reward = beta * (policy_rejected.float() - ref_rejected.float()).detach()
    return {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": policy_chosen.float().detach(),
        "logps/rejected": policy_rejected.float().detach(),
    }
