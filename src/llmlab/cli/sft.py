"""`llmlab sft`: supervised fine-tuning of a checkpoint on chat data (llmlab.align.sft)."""

from __future__ import annotations

import json
import sys


def register(sub, formatter_class) -> None:
    p = sub.add_parser(
        "sft", formatter_class=formatter_class,
        help="fine-tune a checkpoint on chat data (SFT, optional LoRA)",
        description="Supervised fine-tuning: the next-token loss on the assistant's tokens only, from any "
                    "checkpoint\n(pretrained here or written by `llmlab import-hf`). Data: JSONL or Parquet "
                    "records {\"messages\": [...]}\nor {\"prompt\", \"completion\"} (as TRL takes them). A "
                    "tokenizer without the chat tokens gets them\n(embedding and LM head grown, said in one "
                    "line). Config: defaults <- --config TOML <- key=value\noverrides (data.packing=false, "
                    "lora.rank=8, optim.lr=1e-4, train.run_name=NAME, ...).\nWrites "
                    "train.out_dir/train.run_name/ like `llmlab pretrain` (config.toml, metrics.jsonl,\n"
                    "ckpt-STEP/, best.json by val_loss, plots/, summary.json); with LoRA the checkpoints "
                    "hold the\nadapters only and RUN_DIR/merged is the merged model.\n\n"
                    "examples:\n"
                    "  llmlab sft --checkpoint runs/demo/ckpt-000500 --data data/tasks/train.jsonl\n"
                    "  llmlab sft --checkpoint hf-model/ --data chat.parquet lora.rank=8 "
                    "train.run_name=lora\n"
                    "  llmlab sft --config sft.toml --resume auto\n"
                    "  llmlab sft --print-config   # every key with its default")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="the model to fine-tune (sets checkpoint=CKPT)")
    p.add_argument("--data", metavar="FILE", default=None, help="training data (sets data.train=FILE)")
    p.add_argument("--val", metavar="FILE", default=None,
                   help="held-out data (sets data.val=FILE; default: hold back data.val_fraction)")
    p.add_argument("--config", metavar="TOML", default=None, help="a config file")
    p.add_argument("--resume", metavar="PATH|auto|best", default=None,
                   help="continue from a ckpt-STEP dir or a run dir's newest checkpoint; 'auto' = the newest "
                        "complete checkpoint of this run if there is one, else start fresh; 'best' = the "
                        "checkpoint with the lowest val loss")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=_sft)


def _sft(args) -> int:
    from llmlab.align.sft import SFTConfig, run_sft
    from llmlab.config import load_config, to_toml

    flags = {"checkpoint": args.checkpoint, "data.train": args.data, "data.val": args.val}
    overrides = [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]
    cfg = load_config(SFTConfig, args.config, overrides)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    summary = run_sft(cfg, resume=args.resume, say=lambda line: print(line, file=sys.stderr))
    keys = ("run_dir", "step", "tokens", "val_loss", "tokens_per_s", "checkpoint", "merged")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
