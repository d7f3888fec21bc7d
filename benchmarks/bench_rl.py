"""RL step time on CPU: llmlab's PPO and GRPO objectives on the Trainer vs TRL's trainers, the same budget.

One small GPT-2-shape model (n_layer 4, d_model 256, 4 heads, a BPE vocabulary of up to 1024 tokens trained
here, no dropout) is made by llmlab and exported with llmlab.model.hf.save_hf; TRL loads the export, llmlab
trains its own copy of the same weights. Both sides: the same prompts (raw text, tokenized by the exported
tokenizer; ragged lengths), responses sampled at temperature 1 without top-k/top-p up to --response-length
tokens and ended at the tokenizer's eos, a reward a program computes (how many response tokens have an id in
the lower half of the vocabulary: a reward with spread from the first rollout), a frozen reference and a KL
term, torch AdamW at a constant LR (betas 0.9/0.95, no weight decay, clipping 1.0), fp32, no gradient
checkpointing, one process, --threads torch threads (default 1).

GRPO: llmlab's GRPOObjective vs TRL's GRPOTrainer: --prompts prompts x --group responses per rollout,
--minibatches optimizer steps per pass, --epochs passes (TRL: per_device_train_batch_size = prompts * group /
minibatches, steps_per_generation = minibatches, num_iterations = epochs), beta 0.04 (k3), epsilon 0.2,
group-scaled advantages, token-mean loss per minibatch (TRL's loss_type "bnpo").

PPO: TRL 1.16 has no PPOTrainer (it is in neither trl nor trl.experimental; the JSON says so under
`ppo.trl_trainer`). The nearest trainer TRL ships, RLOOTrainer (an on-policy trainer with a KL penalty, the
leave-one-out baseline instead of a value model), stands in, on the same number of episodes per rollout
(--prompts * --group: half as many prompts with 2 responses each for RLOO, one response per prompt for
PPO), minibatches, epochs and response length. llmlab's PPO does more work than
it: a value model (a scalar-head copy of the policy's shape, ppo.value_model="reward", as a reward-model copy
would be; and the value head on the policy, "policy_head", reported beside it), GAE and the value loss.

Measured: the rollouts after the first one (warm-up), each with its updates: episodes (sampled responses)
and response tokens per second of this process's CPU time (other jobs on a shared machine inflate wall time,
not our CPU time) and per wall second, and the CPU seconds of each rollout split into sampling (generate),
scoring (log-probs under the policy and the reference, values, rewards) and update (the optimizer steps).
Targets: llmlab's episodes per CPU-second >= 2x TRL's, for GRPO and for PPO (vs RLOO). Prints one JSON object
ending with `targets` (TRL's log lines go to stderr); exits 1 on a miss (0 with --no-check).

    python benchmarks/bench_rl.py [--prompts 8] [--group 4] [--response-length 32] [--minibatches 2]
                                  [--epochs 2] [--rollouts 3] [--threads 1] [--no-check]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from llmlab.model import ModelConfig, Transformer
from targets import add_no_check, finish, goal

DIMS = dict(n_layer=4, d_model=256, n_head=4, block_size=256)
VOCAB = 1024
LR = 1e-5
GRPO_BETA, PPO_BETA, CLIP = 0.04, 0.05, 0.2
_letters = random.Random(3)
WORDS = ["".join(_letters.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_letters.randint(2, 5)))
         for _ in range(800)]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_model(root: Path):
    """The llmlab policy and its HF export (with the tokenizer) under root/policy."""
    from llmlab.model.hf import save_hf
    from llmlab.tokenizer import Tokenizer

    rng = random.Random(0)
    tok = Tokenizer.train([text(rng, 20000)], vocab_size=VOCAB, progress=False, workers=1)
    torch.manual_seed(0)
    policy = Transformer(ModelConfig.preset("gpt2", "mini", vocab_size=tok.vocab_size, dropout=0.0, **DIMS))
    save_hf(policy, root / "policy", tok)
    return policy


def make_prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [text(rng, rng.randint(6, 24)) + " ?" for _ in range(n)]


class Clock:
    """Process-CPU and wall seconds spent inside the wrapped callables, and between step ends."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.steps: list[tuple[float, float]] = []   # (wall, cpu) at each optimizer step's end
        self.marks: list[dict[str, float]] = []      # self.cpu at each step's end

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - start
        return timed

    def start(self) -> None:
        self.steps = [(time.perf_counter(), time.process_time())]
        self.marks = [dict(self.cpu)]

    def tick(self) -> None:
        self.steps.append((time.perf_counter(), time.process_time()))
        self.marks.append(dict(self.cpu))

    def window(self, first: int) -> dict[str, float]:
        """Seconds from step `first`'s end to the last step's end: wall, cpu, each wrapped part's cpu."""
        (w0, c0), (w1, c1) = self.steps[first], self.steps[-1]
        parts = {k: self.marks[-1].get(k, 0.0) - self.marks[first].get(k, 0.0) for k in self.marks[-1]}
        return {"wall": w1 - w0, "cpu": c1 - c0, **parts}


def figures(clock: Clock, warm_steps: int, episodes: int, tokens: float, rollouts: int) -> dict:
    """Episodes and tokens per CPU/wall second over the timed rollouts, and each rollout's CPU split."""
    w = clock.window(warm_steps)
    sample, rollout = w.get("sample", 0.0), w.get("rollout", 0.0)
    return {"episodes_per_cpu_s": round(episodes / w["cpu"], 2),
            "episodes_per_s": round(episodes / w["wall"], 2),
            "tokens_per_cpu_s": round(tokens / w["cpu"], 1),
            "response_tokens_mean": round(tokens / episodes, 2),
            "per_rollout_cpu_s": {"sample": round(sample / rollouts, 3),
                                  "score": round((rollout - sample) / rollouts, 3),
                                  "update": round((w["cpu"] - rollout) / rollouts, 3),
                                  "total": round(w["cpu"] / rollouts, 3)},
            "cpu_s": round(w["cpu"], 2), "wall_s": round(w["wall"], 2)}


# ---------------------------------------------------------------- TRL

def run_trl(kind: str, root: Path, prompts: list[str], target_id: int, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    group = 2 if kind == "rloo" else args.group
    completions = args.prompts * args.group           # episodes per rollout, as llmlab's
    clock, lengths = Clock(), []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

    def count_reward(prompts, completions, completion_ids, **kwargs):
        lengths.append(sum(len(c) for c in completion_ids))
        return [float(sum(t < target_id for t in c)) for c in completion_ids]

    common = dict(
        output_dir=str(root / f"trl-{kind}"), per_device_train_batch_size=completions // args.minibatches,
        gradient_accumulation_steps=1, steps_per_generation=args.minibatches, num_iterations=args.epochs,
        num_generations=group, max_completion_length=args.response_length, temperature=1.0, top_p=1.0,
        top_k=0, epsilon=CLIP, max_steps=args.rollouts * args.minibatches * args.epochs, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, gradient_checkpointing=False,
        disable_dropout=True, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, beta=GRPO_BETA, loss_type="bnpo", scale_rewards="group")
        trainer_cls = GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(**common, beta=PPO_BETA)
        trainer_cls = RLOOTrainer
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(root / "policy"),
                          reward_funcs=count_reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=AutoTokenizer.from_pretrained(root / "policy"),
                          callbacks=[Timer()])
    trainer._generate = clock.wrap("sample", trainer._generate)
    trainer._generate_and_score_completions = clock.wrap("rollout", trainer._generate_and_score_completions)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return figures(clock, args.minibatches * args.epochs, completions * (args.rollouts - 1),
                   sum(lengths[1:]), args.rollouts - 1)


# ---------------------------------------------------------------- llmlab

class CountReward(nn.Module):
    """A reward 'model' for PPO: its score at each position counts the ids below `target` so far."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def forward(self, idx, output="scores"):
        return (idx < self.target).float().cumsum(dim=1)


def value_model(policy: Transformer) -> Transformer:
    """A scalar-head Transformer of the policy's shape with its trunk (the size of a reward-model copy)."""
    value = Transformer(ModelConfig(**{**vars(policy.config), "head": "scalar"}))
    value.load_state_dict(policy.state_dict(), strict=False)
    return value


def run_llmlab(kind: str, policy: Transformer, token_prompts: list[list[int]], stop_id: int, target_id: int,
               args) -> dict:
    import llmlab.align.rollout as rollout_module
    from llmlab.align.grpo import GRPOConfig, GRPOObjective
    from llmlab.align.ppo import PolicyAndValue, PolicyValueHead, PPOConfig, PPOObjective, frozen
    from llmlab.train.optim import OptimConfig
    from llmlab.train.trainer import Callback, TrainConfig, Trainer

    model = Transformer(policy.config)
    model.load_state_dict(policy.state_dict())
    reference = frozen(model)
    episodes = args.prompts * args.group
    common = dict(stop_ids=[stop_id], pad_id=stop_id)
    if kind == "grpo":
        def reward(indices, ro):
            return ((ro.responses < target_id).float() * ro.mask).sum(dim=1)

        cfg = GRPOConfig(prompts_per_rollout=args.prompts, num_generations=args.group,
                         num_iterations=args.epochs, num_mini_batches=args.minibatches,
                         max_completion_length=args.response_length, beta=GRPO_BETA, epsilon=CLIP, seed=0)
        objective = GRPOObjective(token_prompts, reference, reward, cfg, **common)
    else:
        cfg = PPOConfig(rollout_batch_size=episodes, num_ppo_epochs=args.epochs,
                        num_mini_batches=args.minibatches, response_length=args.response_length,
                        kl_coef=PPO_BETA, cliprange=CLIP, seed=0)
        objective = PPOObjective(token_prompts, reference, CountReward(target_id), cfg, **common)
        value = PolicyValueHead(model.config.d_model) if kind == "ppo_policy_head" else value_model(model)
        model = PolicyAndValue(model, value)
    clock, lengths = Clock(), []
    collect = objective.collect

    def counted_collect(m):
        collect(m)
        lengths.append(float(objective.buffer["mask"].sum()))

    objective.collect = clock.wrap("rollout", counted_collect)
    sample = rollout_module.sample_responses
    rollout_module.sample_responses = clock.wrap("sample", sample)

    class Timer(Callback):
        def on_fit_start(self, trainer):
            clock.start()

        def on_step_end(self, trainer, record):
            clock.tick()

    optim = OptimConfig(lr=LR, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, warmup_steps=0,
                        max_steps=args.rollouts * args.minibatches * args.epochs, min_lr_ratio=1.0)
    train = TrainConfig(eval_every=0, ckpt_every=0, progress=False, plot=False, device="cpu")
    try:
        Trainer(model, objective, objective.batches, optim, train, callbacks=[Timer()]).fit()
    finally:
        rollout_module.sample_responses = sample
    return figures(clock, args.minibatches * args.epochs, episodes * (args.rollouts - 1), sum(lengths[1:]),
                   args.rollouts - 1)


def trl_has_ppo() -> str:
    """Where TRL's PPOTrainer is, or that it is gone."""
    import importlib

    for module in ("trl", "trl.experimental.ppo"):
        with contextlib.suppress(ImportError, AttributeError):
            if getattr(importlib.import_module(module), "PPOTrainer", None) is not None:
                return module
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO rollout")
    ap.add_argument("--group", type=int, default=4,
                    help="GRPO responses per prompt (episodes per rollout = prompts * group)")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass over a rollout")
    ap.add_argument("--epochs", type=int, default=2, help="passes over each rollout")
    ap.add_argument("--rollouts", type=int, default=3, help="rollouts per run; the first is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    add_no_check(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy = make_model(root)
        hf_tok = AutoTokenizer.from_pretrained(root / "policy")
        prompts = make_prompts(4 * args.prompts * args.group)
        token_prompts = [hf_tok(p)["input_ids"] for p in prompts]
        stop_id, target_id = hf_tok.eos_token_id, policy.config.vocab_size // 2
        runs = {"grpo": {"trl": run_trl("grpo", root, prompts, target_id, args),
                         "llmlab": run_llmlab("grpo", policy, token_prompts, stop_id, target_id, args)},
                "ppo": {"trl": run_trl("rloo", root, prompts, target_id, args),
                        "llmlab": run_llmlab("ppo", policy, token_prompts, stop_id, target_id, args),
                        "llmlab_policy_head": run_llmlab("ppo_policy_head", policy, token_prompts, stop_id,
                                                         target_id, args)}}
    import transformers
    import trl

    ppo_where = trl_has_ppo()
    runs["ppo"]["trl_trainer"] = (
        f"PPOTrainer ({ppo_where})" if ppo_where else
        f"RLOOTrainer (num_generations 2): trl {trl.__version__} has no PPOTrainer, in neither trl nor "
        "trl.experimental")
    runs["grpo"]["trl_trainer"] = "GRPOTrainer"
    for name in ("grpo", "ppo"):
        run = runs[name]
        run["ratio"] = round(run["llmlab"]["episodes_per_cpu_s"] / run["trl"]["episodes_per_cpu_s"], 3)
        run["ratio_wall"] = round(run["llmlab"]["episodes_per_s"] / run["trl"]["episodes_per_s"], 3)
    runs["ppo"]["ratio_policy_head"] = round(
        runs["ppo"]["llmlab_policy_head"]["episodes_per_cpu_s"] / runs["ppo"]["trl"]["episodes_per_cpu_s"], 3)
    result = {"benchmark": "rl_step_time_cpu_fp32", "dims": {**DIMS, "vocab_size": policy.config.vocab_size},
              "episodes_per_rollout": args.prompts * args.group, "grpo_prompts": args.prompts,
              "grpo_group": args.group, "response_length": args.response_length,
              "minibatches": args.minibatches,
              "epochs": args.epochs, "rollouts": args.rollouts, "timed_rollouts": args.rollouts - 1,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl.__version__, **runs,
              "load_average_1min": round(os.getloadavg()[0], 2)}
    sys.exit(finish(result, {"grpo_ratio_vs_trl": goal(runs["grpo"]["ratio"], ">=", 2.0),
                             "ppo_ratio_vs_trl": goal(runs["ppo"]["ratio"], ">=", 2.0)}, args.no_check))


if __name__ == "__main__":
    main()
