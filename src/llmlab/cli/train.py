"""`llmlab pretrain` and `llmlab plot`: train a Transformer on token shards, and plot a run's metrics."""

from __future__ import annotations

import json


def register(sub, formatter_class) -> None:
    p = sub.add_parser(
        "pretrain", formatter_class=formatter_class, help="pretrain a Transformer on prepared token shards",
        description="Pretrain a Transformer with next-token cross-entropy on shards from `llmlab data "
                    "prepare`.\nConfig: defaults <- --config TOML <- key=value overrides (keys as in "
                    "configs/*.toml,\ne.g. optim.lr=3e-4 model.n_layer=4 data.shards=data/shards "
                    "train.run_name=exp1), anywhere among the options.\n"
                    "Writes train.out_dir/train.run_name/: config.toml, metrics.jsonl, ckpt-STEP/, "
                    "plots/.\n\n"
                    "examples:\n  llmlab pretrain --config configs/cpu-demo.toml\n"
                    "  llmlab pretrain --config configs/cpu-demo.toml --resume auto\n"
                    "  llmlab pretrain --print-config   # every key with its default")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    p.add_argument("--config", metavar="TOML", default=None,
                   help="a config file or a preset name: tiny, cpu-demo, gpt2-124M (configs/)")
    p.add_argument("--resume", metavar="PATH|auto|best", default=None,
                   help="continue from a ckpt-STEP dir or a run dir's newest checkpoint; 'auto' = the newest "
                        "complete checkpoint of this run if there is one, else start fresh; 'best' = the "
                        "checkpoint with the lowest val loss (best.json)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=_pretrain)

    q = sub.add_parser("plot", formatter_class=formatter_class, help="plot a run's metrics.jsonl as PNGs",
                       description="Write RUN_DIR/plots/loss.png and training.png (loss, LR, grad norm, "
                                   "throughput, marked events) from RUN_DIR/metrics.jsonl, replacing earlier "
                                   "plots (they are derived from the metrics).")
    q.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/demo")
    q.set_defaults(func=_plot)


def _pretrain(args) -> int:
    from llmlab.config import find_preset, load_config, to_toml
    from llmlab.train.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, find_preset(args.config) if args.config else None, args.overrides)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    summary = run_pretrain(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("run_dir", "step", "tokens", "val_loss", "tokens_per_s", "mfu")
                      if k in summary}))
    return 0


def _plot(args) -> int:
    from pathlib import Path

    from llmlab.fsutil import check_output
    from llmlab.train.plot import plot_run

    run_dir = Path(args.run_dir)
    check_output(run_dir / "plots", inputs=[run_dir / "metrics.jsonl"], overwrite=True, into=True,
                 what="plot directory")
    for path in plot_run(run_dir):
        print(path)
    return 0
