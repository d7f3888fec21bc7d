"""`llmlab ppo` and `llmlab grpo`: RL fine-tuning of an SFT checkpoint (llmlab.align.ppo, .grpo)."""

from __future__ import annotations

import json

RESUME_HELP = ("continue from a ckpt-STEP dir or a run dir's newest checkpoint; 'auto' = the newest complete "
               "checkpoint of this run if there is one, else start fresh")
KEYS = ("run_dir", "step", "prompts", "checkpoint")


def register(sub, formatter_class) -> None:
    p = sub.add_parser(
        "ppo", formatter_class=formatter_class,
        help="PPO with a KL penalty against a reward model",
        description=(
            "PPO (Ziegler et al. 2019, InstructGPT): sample responses from the policy, score them with a\n"
            "frozen reward model, and maximise score - beta * KL(policy || the SFT reference) with GAE,\n"
            "the clipped surrogate and a value model started from the reward model. Prompts: JSONL or\n"
            "Parquet records {\"prompt\": text or [messages]} (TRL's prompt-only format; `llmlab data\n"
            "tasks` writes them). Config: defaults <- --config TOML <- key=value overrides\n"
            "(ppo.kl_coef=0.05, ppo.target_kl=6, ppo.rollout_batch_size=16, optim.max_steps=200, ...).\n"
            "One rollout batch every ppo.num_ppo_epochs * ppo.num_mini_batches optimizer steps. Writes\n"
            "train.out_dir/train.run_name/ (config.toml, metrics.jsonl with TRL's names, ckpt-STEP/\n"
            "holding the policy and value/, plots/, summary.json).\n\n"
            "examples:\n"
            "  llmlab ppo --checkpoint runs/sft/ckpt-000300 --reward-model runs/rm/ckpt-000200 \\\n"
            "      --prompts data/tasks/train_prompts.jsonl\n"
            "  llmlab ppo --config ppo.toml ppo.kl_coef=0 train.run_name=ppo-beta0\n"
            "  llmlab ppo --print-config   # every key with its default"))
    _common(p)
    p.add_argument("--reward-model", metavar="CKPT", default=None,
                   help="the reward model (sets reward_model=CKPT)")
    p.set_defaults(func=_ppo)

    g = sub.add_parser(
        "grpo", formatter_class=formatter_class,
        help="GRPO with verifiable rewards (task graders) or a reward model",
        description=(
            "GRPO (Shao et al. 2024): sample grpo.num_generations responses per prompt, reward each\n"
            "(reward=grader: the task graders, 1 for a correct answer; reward=model: a reward model's\n"
            "score), and push up the responses better than their group's mean (grpo.baseline=loo: RLOO's\n"
            "leave-one-out mean), with a k3 KL penalty (grpo.beta) to the SFT reference. Prompts:\n"
            "`llmlab data tasks` prompt files for the graders, or {\"prompt\": ...} records for a reward\n"
            "model. Writes train.out_dir/train.run_name/ like `llmlab ppo`.\n\n"
            "examples:\n"
            "  llmlab grpo --checkpoint runs/sft/ckpt-000300 --prompts data/tasks/train_prompts.jsonl\n"
            "  llmlab grpo --checkpoint runs/sft/ckpt-000300 --reward-model runs/rm/ckpt-000200 \\\n"
            "      --prompts prompts.jsonl\n"
            "  llmlab grpo --print-config   # every key with its default"))
    _common(g)
    g.add_argument("--reward-model", metavar="CKPT", default=None,
                   help="reward from this reward model instead of the graders (sets reward=model, "
                        "reward_model=CKPT)")
    g.set_defaults(func=_grpo)


def _common(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="the SFT policy to start from (sets checkpoint=CKPT)")
    p.add_argument("--prompts", metavar="FILE", default=None, help="prompt records (sets data.prompts=FILE)")
    p.add_argument("--config", metavar="TOML", default=None, help="a config file")
    p.add_argument("--resume", metavar="PATH|auto", default=None, help=RESUME_HELP)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def _load(cls, args, flags: dict):
    from llmlab.config import load_config

    overrides = [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]
    return load_config(cls, args.config, overrides)


def _finish(cfg, args, run) -> int:
    from llmlab.config import to_toml

    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    summary = run(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in KEYS if k in summary}))
    return 0


def _ppo(args) -> int:
    from llmlab.align.ppo import PPORunConfig, run_ppo

    flags = {"checkpoint": args.checkpoint, "reward_model": args.reward_model, "data.prompts": args.prompts}
    return _finish(_load(PPORunConfig, args, flags), args, run_ppo)


def _grpo(args) -> int:
    from llmlab.align.grpo import GRPORunConfig, run_grpo

    flags = {"checkpoint": args.checkpoint, "data.prompts": args.prompts, "reward_model": args.reward_model,
             "reward": "model" if args.reward_model else None}
    return _finish(_load(GRPORunConfig, args, flags), args, run_grpo)
