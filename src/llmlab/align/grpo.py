"""GRPO (Shao et al. 2024) on the one trainer: group-relative advantages, no value model.

    objective = GRPOObjective(prompts, reference, grader_reward(tok, examples), GRPOConfig(...),
                              stop_ids=..., pad_id=...)
    Trainer(policy, objective, objective.batches, optim, TrainConfig(accum_steps=A, ...)).fit()

Every `num_iterations * num_mini_batches` optimizer steps, prepare_step samples `num_generations` (G)
responses to each of `prompts_per_rollout` prompts (llmlab.align.rollout; responses end at the chat template's
end-of-turn) and rewards each response with `reward_fn`: the task graders (grader_reward: 1 for a correct
answer, 0 otherwise) or a reward model (model_reward: its score at the last real token). A response's
advantage is its reward relative to its own group (llmlab.align.rl):
    baseline "group"  (r - mean) / (std + 1e-4) over the G responses to the same prompt (scale_rewards=False:
                      r - mean, Liu et al. 2025)
    baseline "loo"    r minus the mean of the other G - 1 rewards (RLOO, Ahmadian et al. 2024)
and every token of the response gets it. Loss per response token:
    clipped surrogate(ratio = pi / pi_rollout, epsilon) + beta * k3(pi, pi_ref)
summed with weight = response tokens: each minibatch is a token mean (TRL's loss_type "bnpo"/"dapo" rather
than GRPO's per-sequence mean, which weighs a long response's tokens less). Trainer semantics as PPO's
(llmlab.align.ppo): one minibatch = one optimizer step of accum_steps micro-batches, so
prompts_per_rollout * num_generations must be a multiple of num_mini_batches * accum_steps.

Metrics (TRL's names where PPO has them): per rollout objective/scores (mean reward), objective/scores_std,
objective/kl (k3 summed over a response, mean over responses), objective/entropy, val/num_eos_tokens,
completions/mean_length; per update policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, val/ratio,
policy/kl_avg (the k3 term, token mean).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from llmlab.align import rl
from llmlab.align.ppo import (
    Evaluator,
    PromptDataConfig,
    check_models,
    check_split,
    frozen,
    load_frozen,
    mean_over_ranks,
    pad_id_of,
    plot_at_finish,
    policy_tokenizer,
    refuse_fsdp,
    task_eval,
)
from llmlab.align.rollout import (
    RewardFn,
    Rollout,
    RolloutObjective,
    encode_prompts,
    grader_reward,
    last_token_scores,
    pack,
    read_prompt_messages,
    response_logprobs,
    rollout,
    task_prompts,
)
from llmlab.config import NonNegativeFloat, PositiveFloat, PositiveInt, check_config
from llmlab.errors import ConfigError
from llmlab.model import Transformer
from llmlab.train.checkpoint import unwrap
from llmlab.train.distributed import ParallelConfig
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.objective import LossOutput
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig


@dataclass
class GRPOConfig:
    """GRPO settings; names follow TRL's GRPOConfig where it has them."""

    prompts_per_rollout: PositiveInt = 4
    num_generations: PositiveInt = 8          # G: responses per prompt
    num_iterations: PositiveInt = 1           # passes over each rollout batch (TRL's mu)
    num_mini_batches: PositiveInt = 1         # minibatches (optimizer steps) per pass
    max_completion_length: PositiveInt = 32
    temperature: PositiveFloat = 1.0          # sampling temperature (log-probs and KL tempered alike)
    beta: NonNegativeFloat = 0.04             # weight of the k3 KL to the reference
    epsilon: PositiveFloat = 0.2              # clip range of the ratio
    baseline: Literal["group", "loo"] = "group"
    scale_rewards: bool = True                # "group": divide by the group's std
    seed: int = 0


def model_reward(reward_model: nn.Module, missing_eos_penalty: float | None = None) -> RewardFn:
    """A frozen reward model's score at each response's last real token (minus missing_eos_penalty for a
    response cut at the length limit)."""

    @torch.no_grad()
    def reward(indices: list[int], ro: Rollout) -> torch.Tensor:
        reward_model.eval()
        scores = last_token_scores(unwrap(reward_model), ro)
        if missing_eos_penalty:
            scores = scores - missing_eos_penalty * (~ro.ended).float()
        return scores

    return reward


def check_samples(cfg: GRPOConfig, accum_steps: int) -> None:
    check_split(cfg.prompts_per_rollout * cfg.num_generations,
                "grpo.prompts_per_rollout * grpo.num_generations", cfg.num_mini_batches, accum_steps, "grpo")


class GRPOObjective(RolloutObjective):
    """GRPO on rollouts from `prompts` (token-id lists ending with the assistant header), rewarded by
    `reward_fn`; see the module docstring. `objective.batches` is the trainer's batch source."""

    name = "grpo"
    best_metric = "val_accuracy"          # with an evaluator (held-out task prompts); none otherwise
    higher_is_better = True

    def __init__(self, prompts: Sequence[Sequence[int]], reference: nn.Module, reward_fn: RewardFn,
                 cfg: GRPOConfig, *, stop_ids: Sequence[int], pad_id: int, accum_steps: int = 1,
                 evaluator: Evaluator | None = None, rank: int = 0, world_size: int = 1):
        cfg = check_config(cfg, "grpo.")
        check_samples(cfg, accum_steps)
        if cfg.baseline == "loo" and cfg.num_generations < 2:
            raise ConfigError("grpo.baseline='loo' needs grpo.num_generations >= 2; raise it")
        super().__init__(prompts, reference, cfg, cfg.prompts_per_rollout, stop_ids=stop_ids, pad_id=pad_id,
                         accum_steps=accum_steps, evaluator=evaluator, rank=rank, world_size=world_size)
        self.reward_fn = reward_fn

    @torch.no_grad()
    def collect(self, policy: nn.Module) -> None:
        """Sample G responses per prompt, reward them, compute group-relative advantages, queue updates."""
        cfg = self.cfg
        G = cfg.num_generations
        indices = [i for i in self.stream.batch(self._index()) for _ in range(G)]  # prompt-major groups
        timings: dict[str, float] = {}
        ro = rollout(policy, [self.prompts[i] for i in indices], stop_ids=self.stop_ids, pad_id=self.pad_id,
                     max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                     seed=cfg.seed * 1_000_003 + self._index(), reference=self.reference,
                     timings=timings)
        start = time.perf_counter()
        rewards = self.reward_fn(indices, ro).float()
        timings["time/score_s"] += time.perf_counter() - start
        if cfg.baseline == "loo":
            advantages = rl.leave_one_out_advantages(rewards, G)
        else:
            advantages = rl.group_advantages(rewards, G, scale=cfg.scale_rewards)
        ro.scores = rewards
        self.buffer = {**ro.tensors(), "advantages": advantages}
        self.stats = mean_over_ranks({**self._rollout_stats(ro, rewards), **timings})
        self.batches.fill(len(indices), cfg.num_iterations, cfg.num_mini_batches, self.accum,
                          seed=cfg.seed * 1_000_003 + self._index())
        self.rollouts += 1

    def _rollout_stats(self, ro: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        kl = rl.kl_estimate(ro.logprobs, ro.ref_logprobs, "k3") * ro.mask
        stats = {"objective/scores": rewards.mean(),
                 "objective/scores_std": rewards.std() if rewards.numel() > 1 else 0.0,
                 "objective/kl": kl.sum(dim=1).mean(),
                 "objective/entropy": (-ro.logprobs * ro.mask).sum(dim=1).mean(),
                 "val/num_eos_tokens": ro.ended.sum(),
                 "completions/mean_length": ro.mask.sum(dim=1).mean()}
        return {k: float(v) for k, v in stats.items()}

    def loss(self, model: nn.Module, rows: torch.Tensor) -> LossOutput:
        device = next(unwrap(model).parameters()).device  # a restored buffer may sit elsewhere
        cfg, b = self.cfg, {k: v[rows.to(v.device)].to(device) for k, v in self.buffer.items()}
        mb = Rollout(**{k: b.get(k) for k in Rollout.__dataclass_fields__})
        mask = mb.mask
        packed = pack(mb)
        logprobs = response_logprobs(model, mb, cfg.temperature, packed)
        pg = rl.policy_loss_terms(logprobs, mb.logprobs, b["advantages"], cfg.epsilon)
        kl = rl.kl_estimate(logprobs, mb.ref_logprobs, "k3")
        weight = mask.sum()
        metrics = {"policy/approxkl_avg": rl.masked_sum(pg["approxkl"], mask),
                   "policy/clipfrac_avg": rl.masked_sum(pg["clipped"], mask),
                   "loss/policy_avg": rl.masked_sum(pg["loss"], mask),
                   "policy/kl_avg": rl.masked_sum(kl, mask),
                   "val/ratio": rl.masked_sum(pg["ratio"], mask),
                   **{k: v * weight for k, v in self.stats.items()},
                   "n_tokens": packed.idx.numel()}
        loss_sum = rl.masked_sum(pg["loss"] + cfg.beta * kl, mask)
        return LossOutput(loss_sum, weight, {k: v.detach() if isinstance(v, torch.Tensor) else v
                                             for k, v in metrics.items()})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluator(unwrap(model)) if self.evaluator is not None else {}



# ---------------------------------------------------------------- the run: `llmlab grpo`

@dataclass
class GRPORunConfig:
    checkpoint: str = ""           # the policy to start from (an SFT checkpoint); also the frozen reference
    reward: Literal["grader", "model"] = "grader"  # grader: the task graders (prompts from `llmlab data
                                   # tasks`); model: reward_model's score
    reward_model: str = ""         # a reward-model checkpoint, for reward = "model"
    missing_eos_penalty: NonNegativeFloat | None = None  # reward = "model": subtracted when a response
                                   # reaches grpo.max_completion_length without an end-of-turn
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0,
                                                                   max_steps=200, min_lr_ratio=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="grpo", eval_every=0,
                                                                   ckpt_every=50))
    spike: SpikeConfig = field(default_factory=lambda: SpikeConfig(enabled=False))  # RL losses jump by design
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def run_grpo(cfg: GRPORunConfig, resume: str | None = None) -> dict[str, Any]:
    """GRPO from cfg.checkpoint on cfg.data.prompts, rewarded by the task graders or a reward model, on the
    shared launcher; returns the run's summary."""
    cfg = check_config(cfg)

    def resolve(cfg: GRPORunConfig) -> Plan:
        check_models(cfg.checkpoint, cfg.reward_model if cfg.reward == "model" else None, "train")
        refuse_fsdp(cfg.parallel, "GRPO")
        check_samples(cfg.grpo, cfg.train.accum_steps)
        return Plan(cfg, inputs=[cfg.checkpoint, cfg.reward_model, cfg.data.prompts, cfg.data.eval_prompts,
                                 cfg.data.tokenizer])

    def build(run: Run) -> Built:
        cfg = run.config
        policy = Transformer.load(cfg.checkpoint, device=run.device, dtype="fp32")
        tok = policy_tokenizer(cfg.checkpoint, cfg.data.tokenizer, policy.config.vocab_size)
        template = tok.chat_template
        length = (policy.config.block_size, cfg.grpo.max_completion_length, "grpo.max_completion_length")
        if cfg.reward == "grader":
            examples, prompts = task_prompts(tok, cfg.data.prompts, *length)
            reward_fn = grader_reward(tok, examples)
        else:
            prompts = encode_prompts(tok, read_prompt_messages(cfg.data.prompts), *length)
            reward_fn = model_reward(load_frozen(cfg.reward_model, run.device), cfg.missing_eos_penalty)
        evaluator = task_eval(tok, cfg.data.eval_prompts, *length)
        objective = GRPOObjective(prompts, frozen(policy), reward_fn, cfg.grpo, stop_ids=template.stop_ids,
                                  pad_id=pad_id_of(template), accum_steps=cfg.train.accum_steps,
                                  evaluator=evaluator, rank=run.rank, world_size=run.world_size)
        return Built(policy, objective, objective.batches, flops_per_token=policy.flops_per_token(),
                     tokenizer=tok, summary={"prompts": len(prompts)}, finish=plot_at_finish)

    return launch(cfg, build, resume, resolve=resolve)
