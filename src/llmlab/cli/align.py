"""`llmlab reward train|score` and `llmlab dpo`: learning from preference pairs (llmlab.align.reward, dpo)."""

from __future__ import annotations

import json
import sys

from llmlab.cli.options import COUNT

PAIRS = ("\nData: JSONL or Parquet records {\"prompt\", \"chosen\", \"rejected\"} as TRL takes them (strings "
         "or\nmessage lists; the prompt may be implicit in chosen/rejected).")
RESUME = ("continue from a ckpt-STEP dir or a run dir's newest checkpoint; 'auto' = the newest complete "
          "checkpoint of this run if there is one, else start fresh; 'best' = the best checkpoint")


def _run_options(p, best: str) -> None:
    """The options every training verb here shares (as `llmlab sft`)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="the model to start from, normally an SFT checkpoint (sets checkpoint=CKPT)")
    p.add_argument("--data", metavar="FILE", default=None, help="preference pairs (sets data.train=FILE)")
    p.add_argument("--val", metavar="FILE", default=None,
                   help="held-out pairs (sets data.val=FILE; default: hold back data.val_fraction)")
    p.add_argument("--config", metavar="TOML", default=None, help="a config file")
    p.add_argument("--resume", metavar="PATH|auto|best", default=None, help=RESUME + f" ({best})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def register(sub, formatter_class) -> None:
    reward = sub.add_parser("reward", formatter_class=formatter_class,
                            help="train a reward model on preference pairs, or score records with one",
                            description="Reward models: a scalar head on a chat model, trained with the "
                                        "Bradley-Terry loss.")
    actions = reward.add_subparsers(dest="action", metavar="ACTION")
    t = actions.add_parser(
        "train", formatter_class=formatter_class, help="train a reward model (Bradley-Terry)",
        description="Train a reward model: the checkpoint's backbone with its LM head replaced by a scalar "
                    "head,\nread at each sequence's last token; loss -log sigmoid(r_chosen - r_rejected - "
                    "margin)\n(+ reward.center_coefficient * (r_chosen + r_rejected)^2)." + PAIRS +
                    "\nConfig: defaults <- --config TOML <- key=value overrides (reward.center_coefficient="
                    "0.01,\ndata.batch_size=16, optim.lr=1e-5, train.run_name=NAME, ...). Writes "
                    "train.out_dir/train.run_name/\nlike `llmlab pretrain`; best.json names the checkpoint "
                    "with the highest val_accuracy.\n\n"
                    "examples:\n"
                    "  llmlab reward train --checkpoint runs/sft/ckpt-000300 --data prefs.jsonl\n"
                    "  llmlab reward train --config rm.toml --resume auto\n"
                    "  llmlab reward train --print-config   # every key with its default")
    _run_options(t, "by val_accuracy")
    t.set_defaults(func=_reward_train)

    s = actions.add_parser(
        "score", formatter_class=formatter_class, help="score the records of a file with a reward model",
        description="Add a reward to every record of FILE (JSONL or Parquet) and write them to OUT as "
                    "JSONL:\n\"score\" for a conversation ({\"messages\"} or {\"prompt\", \"completion\"}), "
                    "\"score_chosen\" and\n\"score_rejected\" for a preference pair.\n\n"
                    "example:\n  llmlab reward score runs/rm/ckpt-000300 --data samples.jsonl --out "
                    "scored.jsonl")
    s.add_argument("checkpoint", metavar="CKPT", help="a reward-model checkpoint (llmlab reward train)")
    s.add_argument("--data", metavar="FILE", required=True, help="records to score, .jsonl or .parquet")
    s.add_argument("--out", metavar="OUT", required=True, help="the scored records, JSONL")
    s.add_argument("--batch-size", type=COUNT, default=16, help="sequences per forward pass")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=_reward_score)

    d = sub.add_parser(
        "dpo", formatter_class=formatter_class, help="train a policy on preference pairs with DPO",
        description="Direct preference optimisation (Rafailov et al. 2023) from a checkpoint, which is also "
                    "the\nreference: dpo.loss_type sigmoid (dpo.label_smoothing > 0: conservative DPO) or "
                    "ipo, dpo.beta;\nreference log-probs computed once up front (dpo.reference=live: every "
                    "step)." + PAIRS + "\nWith lora.rank > 0 only adapters train and the reference is the "
                    "model with them switched off.\nLogs TRL's metrics (rewards/chosen, rewards/margins, "
                    "logps/chosen, ...); best.json names the\ncheckpoint with the highest "
                    "val_rewards/margins.\n\n"
                    "examples:\n"
                    "  llmlab dpo --checkpoint runs/sft/ckpt-000300 --data prefs.jsonl dpo.beta=0.1\n"
                    "  llmlab dpo --checkpoint runs/sft/ckpt-000300 --data prefs.jsonl dpo.loss_type=ipo "
                    "lora.rank=8\n"
                    "  llmlab dpo --print-config   # every key with its default")
    _run_options(d, "by val_rewards/margins")
    d.set_defaults(func=_dpo)


def _load(cls, args):
    from llmlab.config import load_config

    flags = {"checkpoint": args.checkpoint, "data.train": args.data, "data.val": args.val}
    overrides = [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]
    return load_config(cls, args.config, overrides)


def _train(cls, run, args, keys: tuple[str, ...]) -> int:
    from llmlab.config import to_toml

    cfg = _load(cls, args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    summary = run(cfg, resume=args.resume, say=lambda line: print(line, file=sys.stderr))
    shown = ("run_dir", "step", "tokens", *keys, "tokens_per_s", "checkpoint", "merged")
    print(json.dumps({k: summary[k] for k in shown if k in summary}))
    return 0


def _reward_train(args) -> int:
    from llmlab.align.reward import RewardConfig, run_reward

    return _train(RewardConfig, run_reward, args, ("val_accuracy", "val_margin", "val_loss"))


def _reward_score(args) -> int:
    from llmlab.align.reward import score_file

    result = score_file(args.checkpoint, args.data, args.out, args.batch_size, args.device, args.overwrite)
    print(json.dumps(result))
    return 0


def _dpo(args) -> int:
    from llmlab.align.dpo import DPOConfig, run_dpo

    return _train(DPOConfig, run_dpo, args, ("val_rewards/margins", "val_rewards/accuracies", "val_loss"))
