"""The arithmetic of RL fine-tuning (PPO, GRPO, RLOO) as pure tensor functions: no models, no loop.

Layout. A rollout batch holds B responses as response-aligned tensors [B, R]: row b's response tokens sit in
columns 0 .. n_b - 1 and `mask` [B, R] is 1 there and 0 on the padding after them (a prefix mask; every
response has at least one token). Per-token quantities (log-probs, values, rewards) use the same layout.
Group methods take B = n_prompts * G samples in prompt-major order: rows g*G .. g*G + G - 1 answer prompt g.

What is here, with its source:
    kl_estimate          per-token KL(pi || pi_ref) estimators from sampled tokens (Schulman 2020):
                         k1 = -log r, k3 = (r - 1) - log r with r = pi_ref / pi; both unbiased, k3 >= 0
    per_token_rewards    -beta * KL at every token, plus the sequence's score at its last real token
                         (Ziegler et al. 2019; Stiennon et al. 2020)
    gae                  generalised advantage estimation (Schulman et al. 2016) over padded responses
    whiten               advantages to zero mean / unit variance over the real tokens (masked)
    policy_loss_terms    PPO's clipped surrogate (Schulman et al. 2017), with clip fraction and approx. KL
    value_loss_terms     the clipped value loss of OpenAI's baselines / TRL (0.5 * max of two squared errors)
    group_advantages     GRPO (Shao et al. 2024): (r - mean) / (std + eps) within each prompt's G samples
    leave_one_out_advantages   RLOO (Ahmadian et al. 2024): r_i minus the mean of the other G - 1 rewards
    AdaptiveKLController / FixedKLController   beta, adapted toward a target KL (Ziegler et al. 2019)

Per-token functions return unreduced [B, R] tensors; `masked_sum` / `masked_mean` reduce them, so an
objective can hand the trainer sums and token counts (llmlab.train.objective.LossOutput).
"""

from __future__ import annotations

import torch


# ----- masked reductions -----
def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over the positions where mask is 1 (0-d)."""
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0-d); 0 when the mask is empty."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the masked positions (Bessel's correction, as TRL's masked_var)."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"masked variance needs at least 2 masked values, got {int(n)}")
    centred = (x - masked_mean(x, mask)) ** 2
    return masked_sum(centred, mask) / (n - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x scaled to unit variance over the masked positions (and shifted to zero mean unless shift_mean is
    False); padding positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----- KL and rewards -----
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, given their log-probabilities
    under pi and pi_ref (Schulman, "Approximating KL divergence", 2020). With log r = log pi_ref - log pi:
        k1 = -log r              unbiased, high variance, negative on some tokens
        k3 = (r - 1) - log r     unbiased, lower variance, never negative (GRPO's choice)
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator {kind!r} is unknown; use 'k1' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last real (mask 1) column of each row of a prefix mask [B, R]."""
    lengths = mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("a response has no tokens; every response needs at least one (its mask row is 0)")
    return lengths - 1


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rewards [B, R], non_score_rewards [B, R]): -beta * kl at every real token, and rewards adds
    each row's score [B] at its last real token, never at padding."""
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


# ----- advantages -----
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), each [B, R], 0 on padding.

        delta_t = r_t + gamma * V_{t+1} - V_t   (V past a row's last real token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                          (the value model's regression target)
    """
    B, R = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t] * mask[:, t], adv
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages [N] for N = n_prompts * group_size rewards in prompt-major order: each reward minus
    its group's mean, divided by the group's (unbiased) std + eps unless scale is False (Liu et al. 2025's
    "Dr. GRPO" drops that division)."""
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages [N]: each reward minus the mean of the other group_size - 1 rewards of its prompt."""
    if group_size < 2:
        raise ValueError(f"the leave-one-out baseline needs group_size >= 2, got {group_size}")
    groups = _grouped(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}; "
                         "pass a 1-D tensor of n_prompts * group_size rewards")
    return rewards.reshape(-1, group_size)


# ----- losses -----
def policy_loss_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float = 0.2) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate per token (to be masked and reduced by the caller):
        loss     max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logprobs - old_logprobs)
        clipped  1.0 where the clipped term was the larger (the gradient is cut there), else 0.0
        approxkl 0.5 * (logprobs - old_logprobs)^2 (TRL's policy/approxkl)
        ratio    the probability ratio itself
    `advantages` may be [B, R] or [B] (one per sequence, as in GRPO: broadcast over tokens)."""
    if advantages.dim() == 1 and logprobs.dim() == 2:
        advantages = advantages[:, None]
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return {"loss": torch.maximum(unclipped, clipped), "clipped": (clipped > unclipped).float(),
            "approxkl": 0.5 * log_ratio ** 2, "ratio": ratio}


def value_loss_terms(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                     clip_range: float = 0.2) -> dict[str, torch.Tensor]:
    """The clipped value loss per token: the new value may move at most clip_range from the rollout's value,
        loss    0.5 * max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)
        clipped 1.0 where the clipped error was the larger (TRL's val/clipfrac), else 0.0"""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return {"loss": 0.5 * torch.maximum(err, err_clipped), "clipped": (err_clipped > err).float()}


# ----- the KL coefficient -----
class FixedKLController:
    """A constant beta (the interface of AdaptiveKLController)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing: beta stays."""

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """beta adapted toward a target KL (Ziegler et al. 2019, section 2.2):
        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    where KL is the measured per-sequence KL of the latest rollout batch and n_steps the samples it held."""

    def __init__(self, beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        super().__init__(beta)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
