"""RL step time on CPU: llmlab's PPO and GRPO on the Trainer vs TRL's PPOTrainer and GRPOTrainer, same budget.

One small GPT-2-shape policy (n_layer 4, d_model 256, 4 heads, a BPE vocabulary of up to 1024 tokens trained
here, no dropout) is made by llmlab and exported with llmlab.model.hf.save_hf; TRL loads the export, llmlab
trains its own copy of the same weights. Both sides: the same prompts (raw text, tokenized by the exported
tokenizer; ragged lengths), responses sampled at temperature 1 without top-k/top-p up to --response-length
tokens and ended at the tokenizer's eos, a frozen reference and a KL term, torch AdamW at a constant LR
(betas 0.9/0.95, no weight decay), fp32, no gradient checkpointing, one process per trainer, --threads torch
threads (default 1).

PPO: llmlab's PPOObjective, built as `llmlab ppo` builds it (align.ppo.run_ppo: the reward model loaded from
its checkpoint, the value model a trainable copy of it, ppo.value_model="reward"), vs TRL's PPOTrainer
(trl.experimental.ppo in trl 1.12, the last release that has it; trl 1.16, which the GRPO arm uses, has none).
The reward model is a scalar-head Transformer of the policy's shape on the policy's trunk with a fresh head
(seed 1, untrained: the cost does not depend on what it scores), saved as an llmlab checkpoint for llmlab and
exported with save_hf as GPT2ForSequenceClassification for TRL, which loads it twice: reward model and value
model. --prompts * --group prompts per rollout, one response each; --epochs passes (num_ppo_epochs) of
--minibatches minibatches, one optimizer step each (TRL: per_device_train_batch_size = the rollout batch,
no gradient accumulation); beta 0.05 with the k1 estimator, cliprange and cliprange_value 0.2, vf_coef 0.1,
gamma 1, lam 0.95, no reward whitening, no missing-eos penalty. llmlab clips gradients at norm 1.0; TRL's
PPO loop never clips. TRL's PPOTrainer runs in its own process (benchmarks/_trl_ppo_peer.py, with
benchmarks/.peers/trl-1.12 first on PYTHONPATH; `make bench-peers` installs it; without it this script says
how and exits 2). Reported beside it: llmlab with the value head on the policy (ppo.value_model=
"policy_head"), and, without a target, TRL 1.16's RLOOTrainer on the same episodes per rollout (2 responses
per prompt, the GRPO arm's program reward; --no-rloo skips it), the on-policy trainer that stood in before.

GRPO: llmlab's GRPOObjective vs TRL's GRPOTrainer: --prompts prompts x --group responses per rollout,
--minibatches optimizer steps per pass, --epochs passes (TRL: per_device_train_batch_size = prompts * group /
minibatches, steps_per_generation = minibatches, num_iterations = epochs), beta 0.04 (k3), epsilon 0.2,
group-scaled advantages, token-mean loss per minibatch (TRL's loss_type "bnpo"), gradient clipping 1.0 on
both, and a reward a program computes (how many response tokens have an id in the lower half of the
vocabulary: a reward with spread from the first rollout).

Measured: the rollouts after the first one (warm-up), each with its updates: episodes (sampled responses)
and response tokens per second of the CPU time of the process doing the work (other jobs on a shared machine
inflate wall time, not our CPU time) and per wall second, and the CPU seconds of each rollout split into
sampling (generate), scoring (the rest of the rollout: log-probs under the policy and the reference, values,
rewards, advantages) and update (the optimizer steps). TRL's phases are timed by wrapping the functions its
trainers call (_trl_ppo_peer.py says which). Targets: llmlab's episodes per CPU-second >= 2x TRL's, for PPO
(vs PPOTrainer) and for GRPO. Prints one JSON object ending with `targets` (TRL's log lines go to stderr);
exits 1 on a miss (0 with --no-check).

    python benchmarks/bench_rl.py [--prompts 8] [--group 4] [--response-length 32] [--minibatches 2]
                                  [--epochs 2] [--rollouts 3] [--threads 1] [--no-rloo] [--no-check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from llmlab.model import ModelConfig, Transformer
from made_up_text import text
from targets import add_no_check, finish, goal

DIMS = dict(n_layer=4, d_model=256, n_head=4, block_size=256)
VOCAB = 1024
LR = 1e-5
GRPO_BETA, PPO_BETA, CLIP = 0.04, 0.05, 0.2
VF_COEF, LAM = 0.1, 0.95
BENCH = Path(__file__).resolve().parent
PEER = BENCH / ".peers" / "trl-1.12"    # trl 1.12, the last release with a PPOTrainer (trl.experimental.ppo)
PEER_INSTALL = f"{sys.executable} -m pip install --no-deps --target {PEER} trl==1.12.0"
MEASURED = ("episodes (sampled responses) and response tokens per CPU second of the process doing the work "
            "(TRL's PPOTrainer: its own process) and per wall second, over the rollouts after the first "
            "(warm-up), each with its updates; per_rollout_cpu_s splits a rollout's CPU time into sample "
            "(generation), score (the rest of the rollout: log-probs, reference, values, reward, GAE) and "
            "update (the optimizer passes)")
def make_model(root: Path):
    """The llmlab policy and its HF export (with the tokenizer) under root/policy; the reward model beside it
    (make_reward_model)."""
    from llmlab.model.hf import save_hf
    from llmlab.tokenizer import Tokenizer

    rng = random.Random(0)
    tok = Tokenizer.train([text(rng, 20000)], vocab_size=VOCAB, progress=False, workers=1)
    torch.manual_seed(0)
    policy = Transformer(ModelConfig.preset("gpt2", "mini", vocab_size=tok.vocab_size, dropout=0.0, **DIMS))
    save_hf(policy, root / "policy", tok)
    make_reward_model(root, policy, tok)
    return policy


def make_reward_model(root: Path, policy: Transformer, tok) -> None:
    """The reward model of both PPO runs: a scalar-head Transformer of the policy's shape on the policy's
    trunk with a fresh head (seed 1), as `llmlab reward train` starts one (untrained: the timing does not
    depend on what it scores). Saved as an llmlab checkpoint root/rm (llmlab's ppo.reward_model) and exported
    with save_hf to root/rm-hf (GPT2ForSequenceClassification, TRL's reward and value models)."""
    from llmlab.model.hf import save_hf

    torch.manual_seed(1)
    rm = Transformer(ModelConfig(**{**vars(policy.config), "head": "scalar"}))
    rm.load_state_dict(policy.state_dict(), strict=False)  # all but the LM head, which a scalar head lacks
    rm.save(root / "rm")
    tok.save(root / "rm" / "tokenizer")
    save_hf(rm, root / "rm-hf", tok)


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


def run_trl_ppo(root: Path, token_prompts: list[list[int]], args) -> dict:
    """TRL 1.12's PPOTrainer in its own process (benchmarks/_trl_ppo_peer.py), on the HF exports under root:
    the settings go in as JSON, its figures come back as JSON on stdout."""
    settings = {"policy": str(root / "policy"), "reward_model": str(root / "rm-hf"),
                "out": str(root / "trl-ppo"), "prompts": token_prompts, "episodes": args.prompts * args.group,
                "minibatches": args.minibatches,
                "epochs": args.epochs, "rollouts": args.rollouts, "response_length": args.response_length,
                "beta": PPO_BETA, "cliprange": CLIP, "vf_coef": VF_COEF, "lam": LAM, "lr": LR,
                "threads": args.threads, "seed": 0}
    file = root / "trl-ppo.json"
    file.write_text(json.dumps(settings))
    paths = [str(PEER), str(BENCH), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, str(BENCH / "_trl_ppo_peer.py"), str(file)], env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- llmlab

def run_llmlab(kind: str, policy: Transformer, token_prompts: list[list[int]], stop_id: int, pad_id: int,
               target_id: int, root: Path, args) -> dict:
    """llmlab's GRPO ("grpo") or PPO against the reward model root/rm with the value model its copy ("ppo")
    or a head on the policy ("ppo_policy_head"), built as `llmlab ppo` builds them (align.ppo.run_ppo)."""
    import llmlab.align.rollout as rollout_module
    from llmlab.align.grpo import GRPOConfig, GRPOObjective
    from llmlab.align.ppo import PolicyAndValue, PPOConfig, PPOObjective, frozen, load_frozen, make_value
    from llmlab.train.optim import OptimConfig
    from llmlab.train.trainer import Callback, TrainConfig, Trainer

    model = Transformer(policy.config)
    model.load_state_dict(policy.state_dict())
    reference = frozen(model)
    episodes = args.prompts * args.group
    if kind == "grpo":
        def reward(indices, ro):
            return ((ro.responses < target_id).float() * ro.mask).sum(dim=1)

        cfg = GRPOConfig(prompts_per_rollout=args.prompts, num_generations=args.group,
                         num_iterations=args.epochs, num_mini_batches=args.minibatches,
                         max_completion_length=args.response_length, beta=GRPO_BETA, epsilon=CLIP, seed=0)
        objective = GRPOObjective(token_prompts, reference, reward, cfg, stop_ids=[stop_id], pad_id=stop_id)
    else:
        cfg = PPOConfig(rollout_batch_size=episodes, num_ppo_epochs=args.epochs,
                        num_mini_batches=args.minibatches, response_length=args.response_length,
                        temperature=1.0, kl_coef=PPO_BETA, kl_estimator="k1", gamma=1.0, lam=LAM,
                        cliprange=CLIP, cliprange_value=CLIP, vf_coef=VF_COEF, whiten_rewards=False,
                        missing_eos_penalty=None, seed=0,
                        value_model="policy_head" if kind == "ppo_policy_head" else "reward")
        reward_model = load_frozen(str(root / "rm"), "cpu")
        objective = PPOObjective(token_prompts, reference, reward_model, cfg, stop_ids=[stop_id],
                                 pad_id=pad_id)
        model = PolicyAndValue(model, make_value(cfg.value_model, model, reward_model))
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


def ratios(llmlab: dict, trl: dict) -> dict:
    """llmlab's episodes per CPU-second (and per wall second) over TRL's."""
    return {"ratio": round(llmlab["episodes_per_cpu_s"] / trl["episodes_per_cpu_s"], 3),
            "ratio_wall": round(llmlab["episodes_per_s"] / trl["episodes_per_s"], 3)}


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
    ap.add_argument("--no-rloo", action="store_true", help="skip the RLOOTrainer row")
    add_no_check(ap)
    args = ap.parse_args()
    if not (PEER / "trl" / "experimental" / "ppo").is_dir():
        print(f"bench_rl: TRL's PPOTrainer (trl 1.12) is not installed in {PEER}; install it with: "
              f"{PEER_INSTALL}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy = make_model(root)
        hf_tok = AutoTokenizer.from_pretrained(root / "policy")
        prompts = make_prompts(4 * args.prompts * args.group)
        token_prompts = [hf_tok(p)["input_ids"] for p in prompts]
        stop_id, pad_id = hf_tok.eos_token_id, hf_tok.pad_token_id
        target_id = policy.config.vocab_size // 2

        def llmlab(kind: str) -> dict:
            return run_llmlab(kind, policy, token_prompts, stop_id, pad_id, target_id, root, args)

        runs = {"grpo": {"trl": run_trl("grpo", root, prompts, target_id, args), "llmlab": llmlab("grpo"),
                         "trl_trainer": "trl.GRPOTrainer"},
                "ppo": {"trl": run_trl_ppo(root, token_prompts, args), "llmlab": llmlab("ppo"),
                        "llmlab_policy_head": llmlab("ppo_policy_head"),
                        "trl_trainer": "trl.experimental.ppo.PPOTrainer (trl 1.12.0, its own process)"}}
        if not args.no_rloo:
            runs["rloo"] = {"trl": run_trl("rloo", root, prompts, target_id, args),
                            "trl_trainer": "trl.RLOOTrainer (num_generations 2, the program reward)"}
    import transformers
    import trl

    for name in ("grpo", "ppo"):
        runs[name].update(ratios(runs[name]["llmlab"], runs[name]["trl"]))
    ppo = runs["ppo"]
    ppo["ratio_policy_head"] = ratios(ppo["llmlab_policy_head"], ppo["trl"])["ratio"]
    if "rloo" in runs:  # reported, no target: a different algorithm (module docstring)
        runs["rloo"]["ppo_ratio"] = ratios(ppo["llmlab"], runs["rloo"]["trl"])["ratio"]
    result = {"benchmark": "rl_step_time_cpu_fp32", "dims": {**DIMS, "vocab_size": policy.config.vocab_size},
              "episodes_per_rollout": args.prompts * args.group, "grpo_prompts": args.prompts,
              "grpo_group": args.group, "response_length": args.response_length,
              "minibatches": args.minibatches, "epochs": args.epochs, "rollouts": args.rollouts,
              "timed_rollouts": args.rollouts - 1, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
              "trl_ppo": ppo["trl"]["trl"], "measured": MEASURED, **runs,
              "load_average_1min": round(os.getloadavg()[0], 2)}
    sys.exit(finish(result, {"grpo_ratio_vs_trl": goal(runs["grpo"]["ratio"], ">=", 2.0),
                             "ppo_ratio_vs_trl": goal(ppo["ratio"], ">=", 2.0)}, args.no_check))


if __name__ == "__main__":
    main()
