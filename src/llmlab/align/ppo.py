"""PPO with a KL penalty (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) on the one trainer.

    model = PolicyAndValue(policy, value_from(reward_model))     # what the Trainer trains (one optimizer)
    objective = PPOObjective(prompts, reference, reward_model, PPOConfig(...), stop_ids=..., pad_id=...)
    Trainer(model, objective, objective.batches, optim, TrainConfig(accum_steps=A, ...)).fit()

Every `num_ppo_epochs * num_mini_batches` optimizer steps, prepare_step collects a rollout batch of
`rollout_batch_size` prompts (llmlab.align.rollout): responses sampled from the policy and ended at the chat
template's end-of-turn, their log-probs under the policy (from the sampler) and the frozen reference, the
frozen reward model's score at the last real token (minus missing_eos_penalty for a response cut at the
length limit), and the value model's values (for the value head: from the sampler's hidden states, so no
second policy forward). Every forward after sampling, and the update's, runs on ragged rows without
padding, each prompt once (llmlab.align.rollout.pack). Then, with llmlab.align.rl:
    rewards    = -beta * KL estimate (k1 or k3) per token, + the score at the last token
    advantages = GAE(gamma, lam) over the response tokens, whitened over the batch; returns = A + V
and the batch's rows are queued for `num_ppo_epochs` passes, each a fresh shuffle split into
`num_mini_batches` minibatches. Trainer semantics: one minibatch = one optimizer step, made of the trainer's
`accum_steps` micro-batches; so rollout_batch_size must be a multiple of num_mini_batches * accum_steps, and
optim.max_steps counts minibatch updates (rollouts = max_steps / (num_ppo_epochs * num_mini_batches)).
Under DDP every rank rolls out its own prompts with its own seed (a step learns from world_size times as
many responses), and the rollout statistics (so the adaptive beta) are averaged over ranks; FSDP is refused.

Loss per response token (summed, weight = response tokens, so a minibatch's loss is the token mean however it
is split into micro-batches, as TRL's masked means):
    clipped surrogate(ratio = pi / pi_rollout, cliprange) + vf_coef * clipped value loss(cliprange_value)

The value model (ppo.value_model) is by default ("reward") a separate scalar-head Transformer, initialised
from the reward model as in InstructGPT and TRL; or ("policy_head") a Linear(d_model, 1) head on the policy's
final hidden states (PolicyValueHead, zero-initialised): no second network to run or store, one forward
gives both log-probs and values, and the value loss (times vf_coef) also trains the policy's trunk. Either
way policy and value train together in PolicyAndValue under one optimizer (TRL's PolicyAndValueWrapper)
and the checkpoint keeps the value model (or head) in its value/ subdirectory.
beta is fixed (`kl_coef`) or adapted toward `target_kl` (Ziegler et al.'s controller, horizon `kl_horizon`).

Metrics (TRL's names): per rollout batch objective/kl (summed over a response's tokens, mean over responses),
objective/entropy (-sum log pi of the sampled tokens), objective/non_score_reward (-beta * KL summed),
objective/rlhf_reward (score + non-score reward), objective/scores, objective/beta, val/num_eos_tokens
(responses that ended on a stop id), completions/mean_length; per update (token means) policy/approxkl_avg,
policy/clipfrac_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg, val/ratio. A rollout batch's metrics
are logged at each of its update steps (the trainer's weighted mean of a constant is that constant), with
time/sample_s and time/score_s: the rollout's seconds spent sampling and scoring. With data.eval_prompts (a
task prompt set) each evaluation grades greedy answers: val_accuracy, the true accuracy a reward model only
stands in for, picks the best checkpoint. RUN_DIR/plots/rl.png plots them all (plot_rl).
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmlab.align import rl
from llmlab.align.rollout import (
    Rollout,
    RolloutObjective,
    TaskEval,
    encode_prompts,
    pack,
    read_prompt_messages,
    response_values,
    rollout,
    task_prompts,
)
from llmlab.config import Fraction, NonEmptyStr, NonNegativeFloat, PositiveFloat, PositiveInt, check_config
from llmlab.errors import CheckpointError, ConfigError
from llmlab.fsutil import write_bytes_atomic
from llmlab.model import ModelConfig, Transformer
from llmlab.model.loss import linear_token_logprobs
from llmlab.model.transformer import RaggedLayout, read_config
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer
from llmlab.train.checkpoint import Checkpointer, read_model, unwrap, write_model
from llmlab.train.distributed import ParallelConfig, world
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.metrics import read_metrics
from llmlab.train.objective import LossOutput
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig


@dataclass
class PPOConfig:
    """PPO settings; names follow TRL's PPOConfig where it has them."""

    rollout_batch_size: PositiveInt = 16     # prompts (= responses) per rollout batch
    num_ppo_epochs: PositiveInt = 4          # passes over each rollout batch
    num_mini_batches: PositiveInt = 1        # minibatches (optimizer steps) per pass
    response_length: PositiveInt = 32        # max new tokens per response
    temperature: PositiveFloat = 1.0         # sampling temperature; log-probs, ratios and KL use the same
                                             # tempered distribution softmax(logits / temperature)
    kl_coef: NonNegativeFloat = 0.05         # beta: weight of the per-token KL penalty (initial, if adaptive)
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: PositiveFloat | None = None   # adapt beta toward this per-response KL (None: fixed beta)
    kl_horizon: PositiveInt = 10_000         # the adaptive controller's horizon, in responses
    gamma: Fraction = 1.0
    lam: Fraction = 0.95
    cliprange: PositiveFloat = 0.2
    cliprange_value: PositiveFloat = 0.2
    vf_coef: NonNegativeFloat = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: NonNegativeFloat | None = None  # subtracted from the score of a response that
                                             # reached response_length without an end-of-turn
    value_model: Literal["reward", "policy_head"] = "reward"  # a copy of the reward model, or a head on the
                                             # policy's hidden states (PolicyValueHead)
    seed: int = 0

    def controller(self) -> rl.FixedKLController:
        if self.target_kl is None:
            return rl.FixedKLController(self.kl_coef)
        return rl.AdaptiveKLController(self.kl_coef, self.target_kl, self.kl_horizon)


def check_split(samples: int, what: str, num_mini_batches: int, accum_steps: int, section: str) -> None:
    """ConfigError unless a rollout batch of `samples` splits into minibatches of equal micro-batches."""
    need = num_mini_batches * accum_steps
    if samples % need:
        raise ConfigError(f"{what} = {samples} must be a multiple of {section}.num_mini_batches * "
                          f"train.accum_steps = {need}; change one of them")


Evaluator = Callable[[nn.Module], dict]   # policy -> held-out metrics (llmlab.align.rollout.TaskEval)


class PolicyValueHead(nn.Module):
    """A value head on the policy: hidden states [B, T, d_model] -> values [B, T] (float32). Zero-initialised,
    so every value starts at 0 and the policy's first update is the policy loss alone."""

    def __init__(self, d_model: int):
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module for the trainer. One forward runs both, so a DDP wrapper
    sees every parameter used once per backward:
        model(idx, targets, temperature, layout) -> (the policy's log p(targets | idx) [B, T] at
                                                     `temperature`, the values [B, T])
    `layout`: ragged rows (llmlab.align.rollout.Packed.layout; then both cover its outputs), or None. With a
    PolicyValueHead the policy runs once: log-probs and values come from the same hidden states."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                layout: RaggedLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.value, PolicyValueHead):
            hidden = self.policy(idx, output="hidden", layout=layout)
            return token_logprobs(self.policy, hidden / temperature, targets), self.value(hidden)
        logprobs = self.policy(idx, targets=targets, output="logprobs", temperature=temperature,
                               layout=layout)
        return logprobs, self.value(idx, output="scores", layout=layout).float()


def token_logprobs(policy: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) [B, T] from the policy's final hidden states, as policy(..., output="logprobs")."""
    if isinstance(policy.lm_head, nn.Linear):
        return linear_token_logprobs(hidden, policy.lm_head.weight, targets)
    logits = policy.head(hidden).float()  # a swapped-in head (e.g. quantized): the plain way
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def rollout_values(value: nn.Module, ro: Rollout) -> torch.Tensor:
    """[B, R] the value of each response token's state: a value head on the sampler's hidden states
    (ro.hidden), or the value model's scores on ragged rows; 0 on padding."""
    if isinstance(value, PolicyValueHead):
        return value(ro.hidden) * ro.mask
    return response_values(value, ro)


def value_from(reward_model: nn.Module) -> nn.Module:
    """A trainable copy of the reward model, to serve as the value model."""
    value = copy.deepcopy(unwrap(reward_model))
    value.requires_grad_(True)
    return value.train()


def make_value(kind: str, policy: nn.Module, reward_model: nn.Module) -> nn.Module:
    """The value model ppo.value_model asks for: "reward" (value_from) or "policy_head" (PolicyValueHead)."""
    if kind == "policy_head":
        return PolicyValueHead(unwrap(policy).config.d_model).to(next(policy.parameters()).device)
    return value_from(reward_model)


def frozen(model: nn.Module) -> nn.Module:
    """A frozen copy (the reference policy): eval mode, no gradients."""
    ref = copy.deepcopy(unwrap(model))
    ref.requires_grad_(False)
    return ref.eval()


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(policy, value) of a PolicyAndValue, however it is wrapped."""
    inner = unwrap(model)
    return inner.policy, inner.value


class PPOObjective(RolloutObjective):
    """PPO on rollouts from `prompts` (token-id lists ending with the assistant header); see the module
    docstring. `objective.batches` is the trainer's batch source."""

    name = "ppo"
    best_metric = "val_accuracy"          # with an evaluator (held-out task prompts); none otherwise
    higher_is_better = True

    def __init__(self, prompts: Sequence[Sequence[int]], reference: nn.Module, reward_model: nn.Module,
                 cfg: PPOConfig, *, stop_ids: Sequence[int], pad_id: int, accum_steps: int = 1,
                 evaluator: Evaluator | None = None, rank: int = 0, world_size: int = 1):
        cfg = check_config(cfg, "ppo.")
        check_split(cfg.rollout_batch_size, "ppo.rollout_batch_size", cfg.num_mini_batches, accum_steps,
                    "ppo")
        super().__init__(prompts, reference, cfg, cfg.rollout_batch_size, stop_ids=stop_ids, pad_id=pad_id,
                         accum_steps=accum_steps, evaluator=evaluator, rank=rank, world_size=world_size)
        self.reward_model, self.kl_ctl = reward_model, cfg.controller()

    # ----- collecting a rollout batch -----
    @torch.no_grad()
    def collect(self, model: nn.Module) -> None:
        """Roll out the next batch of prompts, compute rewards and advantages, queue the updates."""
        cfg = self.cfg
        policy, value = parts(model)
        prompts = [self.prompts[i] for i in self.stream.batch(self._index())]
        timings: dict[str, float] = {}
        head = isinstance(value, PolicyValueHead)
        ro = rollout(policy, prompts, stop_ids=self.stop_ids, pad_id=self.pad_id,
                     max_new_tokens=cfg.response_length, temperature=cfg.temperature,
                     seed=cfg.seed * 1_000_003 + self._index(), reference=self.reference,
                     reward_model=self.reward_model, missing_eos_penalty=cfg.missing_eos_penalty,
                     timings=timings, hidden=head)
        start = time.perf_counter()
        was_training = value.training
        value.eval()
        values = rollout_values(value, ro)
        value.train(was_training)
        ro.hidden = None  # used up: the buffer does not keep it
        timings["time/score_s"] += time.perf_counter() - start
        mask = ro.mask
        kl = rl.kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * mask
        beta = self.kl_ctl.beta
        rewards, non_score = rl.per_token_rewards(kl, ro.scores, mask, beta)
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = rl.whiten(advantages, mask) if mask.sum() > 1 else advantages
        self.buffer = {**ro.tensors(), "values": values, "advantages": advantages, "returns": returns}
        self.stats = mean_over_ranks({**rollout_stats(ro, kl, non_score, beta), **timings})
        self.kl_ctl.update(self.stats["objective/kl"], len(prompts))
        self.batches.fill(len(prompts), cfg.num_ppo_epochs, cfg.num_mini_batches, self.accum,
                          seed=cfg.seed * 1_000_003 + self._index())
        self.rollouts += 1

    # ----- one micro-batch of an update -----
    def loss(self, model: nn.Module, rows: torch.Tensor) -> LossOutput:
        device = next(unwrap(model).parameters()).device  # a restored buffer may sit elsewhere
        cfg, b = self.cfg, {k: v[rows.to(v.device)].to(device) for k, v in self.buffer.items()}
        mb = Rollout(**{k: b.get(k) for k in Rollout.__dataclass_fields__})
        mask = mb.mask
        packed = pack(mb)
        per_position = model(packed.idx, packed.targets, cfg.temperature, packed.layout)
        logprobs, values = (packed.gather(x) * mask for x in per_position)
        pg = rl.policy_loss_terms(logprobs, mb.logprobs, b["advantages"], cfg.cliprange)
        vf = rl.value_loss_terms(values, b["values"], b["returns"], cfg.cliprange_value)
        loss_sum = rl.masked_sum(pg["loss"] + cfg.vf_coef * vf["loss"], mask)
        weight = mask.sum()
        metrics = {"policy/approxkl_avg": rl.masked_sum(pg["approxkl"], mask),
                   "policy/clipfrac_avg": rl.masked_sum(pg["clipped"], mask),
                   "loss/policy_avg": rl.masked_sum(pg["loss"], mask),
                   "loss/value_avg": rl.masked_sum(vf["loss"], mask),
                   "val/clipfrac_avg": rl.masked_sum(vf["clipped"], mask),
                   "val/ratio": rl.masked_sum(pg["ratio"], mask),
                   **{k: v * weight for k, v in self.stats.items()},
                   "n_tokens": packed.idx.numel()}
        return LossOutput(loss_sum, weight, {k: _detached(v) for k, v in metrics.items()})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluator(parts(model)[0]) if self.evaluator is not None else {}

    # ----- state -----
    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each rollout statistic averaged over the ranks (so the adaptive beta stays the same on all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, (values / dist.get_world_size()).tolist(), strict=True))


def rollout_stats(ro: Rollout, kl: torch.Tensor, non_score: torch.Tensor, beta: float) -> dict[str, float]:
    """TRL's per-rollout metrics: per-response sums over tokens, means over responses."""
    non_score_sum = non_score.sum(dim=1)
    stats = {"objective/kl": kl.sum(dim=1).mean(),
             "objective/entropy": (-ro.logprobs * ro.mask).sum(dim=1).mean(),
             "objective/non_score_reward": non_score_sum.mean(),
             "objective/rlhf_reward": (ro.scores + non_score_sum).mean(),
             "objective/scores": ro.scores.mean(),
             "objective/beta": beta,
             "val/num_eos_tokens": ro.ended.sum(),
             "completions/mean_length": ro.mask.sum(dim=1).mean()}
    return {k: float(v) for k, v in stats.items()}


def _detached(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


# ---------------------------------------------------------------- the run: `llmlab ppo`

@dataclass
class PromptDataConfig:
    prompts: NonEmptyStr = "data/tasks/train_prompts.jsonl"  # {"prompt": text | [messages]} per line
    eval_prompts: str = ""         # a task prompt set (`llmlab data tasks`): greedy answers graded at each
                                   # evaluation (val_accuracy, the best checkpoint's metric); "": none
    tokenizer: str = ""            # "" -> the policy checkpoint's tokenizer/ copy


@dataclass
class PPORunConfig:
    checkpoint: str = ""           # the policy to start from (an SFT checkpoint); also the frozen reference
    reward_model: str = ""         # a reward-model checkpoint (head "scalar"); the value model starts as it
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0,
                                                                   max_steps=200, min_lr_ratio=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="ppo", eval_every=0,
                                                                   ckpt_every=50))
    spike: SpikeConfig = field(default_factory=lambda: SpikeConfig(enabled=False))  # RL losses jump by design
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


class PPOCheckpointer(Checkpointer):
    """Checkpoints of PolicyAndValue: the policy as a plain checkpoint (every verb reads it) and the value
    model (or the PolicyValueHead's weights) in its value/ subdirectory; the rest (train_state.pt with both
    models' optimizer state and the objective's controller and rollout buffer, tokenizer/) as for any run."""

    def write_model(self, model: nn.Module, directory: Path) -> None:
        write_model(model.policy, directory)
        (directory / VALUE_DIR).mkdir()
        write_model(model.value, directory / VALUE_DIR)

    def read_model(self, model: nn.Module, directory: Path) -> None:
        read_model(model.policy, directory)
        read_model(model.value, Path(directory) / VALUE_DIR)


VALUE_DIR = "value"


def policy_tokenizer(checkpoint: str, tokenizer: str, vocab_size: int) -> Tokenizer:
    """data.tokenizer (checked against the policy) or the policy checkpoint's tokenizer/ copy."""
    path = Path(tokenizer) if tokenizer else Path(checkpoint) / "tokenizer"
    if not path.is_dir():
        if tokenizer:
            raise ConfigError(f"data.tokenizer={tokenizer} is not a directory; point it at a saved "
                              "tokenizer, or set it to \"\" to use the checkpoint's")
        raise CheckpointError(f"checkpoint {checkpoint} has no tokenizer/ directory; pass data.tokenizer=DIR "
                              "(the tokenizer the policy was trained with)")
    tok = Tokenizer.load(path)
    if tokenizer:
        require_same_tokenizer(checkpoint_tokenizer(checkpoint, vocab_size), directory_tokenizer(path, tok),
                               "point data.tokenizer at the policy's tokenizer, or drop it")
    return tok


def refuse_fsdp(parallel: ParallelConfig, section: str) -> None:
    """Rollouts generate with the whole policy on each rank: FSDP's sharded parameters cannot."""
    if parallel.resolved_strategy(world()[1]) == "fsdp":
        raise ConfigError(f"{section} with parallel.strategy=fsdp is not supported (rollouts need the whole "
                          "policy on each rank); use parallel.strategy=ddp or one process")


def check_models(checkpoint: str, reward_model: str | None, what: str) -> ModelConfig:
    """The policy's ModelConfig, after checking both checkpoints exist, the policy has an LM head, the reward
    model a scalar head and the policy's tokenizer (CheckpointError / TokenizerError, one line)."""
    if not checkpoint:
        raise ConfigError(f"checkpoint is not set; pass --checkpoint CKPT (the SFT policy to {what})")
    policy = read_config(Path(checkpoint))
    if policy.head != "lm":
        raise CheckpointError(f"checkpoint {checkpoint} has a {policy.head!r} head; the policy needs an LM "
                              "head (an SFT checkpoint)")
    if reward_model is None:
        return policy
    if not reward_model:
        raise ConfigError("reward_model is not set; pass --reward-model CKPT (from `llmlab reward train`)")
    rm = read_config(Path(reward_model))
    if rm.head != "scalar":
        raise CheckpointError(f"reward model {reward_model} has head {rm.head!r}; pass a reward-model "
                              "checkpoint (head \"scalar\", from `llmlab reward train`)")
    require_same_tokenizer(checkpoint_tokenizer(checkpoint, policy.vocab_size),
                           checkpoint_tokenizer(reward_model, rm.vocab_size),
                           "train the reward model from the policy's SFT checkpoint (the same token ids)")
    return policy


def task_eval(tok, path: str, block_size: int, max_new_tokens: int, length_key: str) -> TaskEval | None:
    """The held-out accuracy evaluator of a task prompt set (None for path "")."""
    if not path:
        return None
    examples, prompts = task_prompts(tok, path, block_size, max_new_tokens, length_key)
    template = tok.chat_template
    return TaskEval(tok, examples, prompts, stop_ids=template.stop_ids, pad_id=pad_id_of(template),
                    max_new_tokens=max_new_tokens)


def load_frozen(path: str, device) -> Transformer:
    model = Transformer.load(path, device=device, dtype="fp32")
    model.requires_grad_(False)
    return model.eval()


def run_ppo(cfg: PPORunConfig, resume: str | None = None) -> dict[str, Any]:
    """PPO from cfg.checkpoint against cfg.reward_model on cfg.data.prompts, on the shared launcher (resume:
    a checkpoint, a run dir, "auto" or "best"); returns the run's summary."""
    cfg = check_config(cfg)

    def resolve(cfg: PPORunConfig) -> Plan:
        check_models(cfg.checkpoint, cfg.reward_model, "improve")
        refuse_fsdp(cfg.parallel, "PPO")
        check_split(cfg.ppo.rollout_batch_size, "ppo.rollout_batch_size", cfg.ppo.num_mini_batches,
                    cfg.train.accum_steps, "ppo")
        return Plan(cfg, inputs=[cfg.checkpoint, cfg.reward_model, cfg.data.prompts, cfg.data.eval_prompts,
                                 cfg.data.tokenizer])

    def build(run: Run) -> Built:
        cfg = run.config
        policy = Transformer.load(cfg.checkpoint, device=run.device, dtype="fp32")
        tok = policy_tokenizer(cfg.checkpoint, cfg.data.tokenizer, policy.config.vocab_size)
        template = tok.chat_template
        prompts = encode_prompts(tok, read_prompt_messages(cfg.data.prompts), policy.config.block_size,
                                 cfg.ppo.response_length, "ppo.response_length")
        reward_model = load_frozen(cfg.reward_model, run.device)
        evaluator = task_eval(tok, cfg.data.eval_prompts, policy.config.block_size, cfg.ppo.response_length,
                              "ppo.response_length")
        objective = PPOObjective(prompts, frozen(policy), reward_model, cfg.ppo, stop_ids=template.stop_ids,
                                 pad_id=pad_id_of(template), accum_steps=cfg.train.accum_steps,
                                 evaluator=evaluator, rank=run.rank, world_size=run.world_size)
        model = PolicyAndValue(policy, make_value(cfg.ppo.value_model, policy, reward_model))
        return Built(model, objective, objective.batches, flops_per_token=policy.flops_per_token(),
                     tokenizer=tok, checkpointer=PPOCheckpointer, summary={"prompts": len(prompts)},
                     finish=plot_at_finish)

    return launch(cfg, build, resume, resolve=resolve)


def pad_id_of(template) -> int:
    """The template's pad id, else its end-of-turn id (padding is masked out either way)."""
    return template.pad_id if template.pad_id is not None else template.end_of_turn_id


# ---------------------------------------------------------------- plots

RL_PANELS = (
    ("objective/scores", "reward (score)"),
    ("val_accuracy", "held-out task accuracy"),
    ("objective/kl", "KL to the reference (per response)"),
    ("completions/mean_length", "response length (tokens)"),
    ("objective/entropy", "entropy (per response)"),
    ("objective/rlhf_reward", "RLHF reward"),
    ("policy/clipfrac_avg", "policy clip fraction"),
    ("policy/approxkl_avg", "approx. KL per update"),
    ("loss/policy_avg", "policy loss"),
    ("loss/value_avg", "value loss"),
    ("objective/beta", "beta (KL coefficient)"),
    ("val/num_eos_tokens", "responses ended"),
)


def plot_rl(run_dir: str | Path) -> Path | None:
    """RUN_DIR/plots/rl.png: the RL metrics the run logged (those of RL_PANELS it has), one panel each
    over optimizer steps; None when it logged none."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    panels = [(k, label) for k, label in RL_PANELS if any(r.get(k) is not None for r in records)]
    if not panels:
        return None
    cols = 3
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, (key, label) in enumerate(panels, start=1):
        ax = fig.add_subplot(rows, cols, i)
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 20 else None, linewidth=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = run_dir / "plots" / "rl.png"
    write_bytes_atomic(path, buf.getvalue())
    return path


def plot_at_finish(trainer, summary: dict) -> None:
    """Built.finish for RL runs: rl.png beside the trainer's plots (rank 0, when train.plot is on)."""
    if trainer.is_main and trainer.cfg.plot and trainer.run_dir is not None:
        path = plot_rl(trainer.run_dir)
        if path is not None:
            summary["plot"] = str(path)
