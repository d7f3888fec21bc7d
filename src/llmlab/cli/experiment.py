"""`llmlab experiment NAME`: experiments that compose the library and write a report (one subcommand each)."""

from __future__ import annotations


def register(sub, formatter_class) -> None:
    e = sub.add_parser("experiment", formatter_class=formatter_class,
                       help="run an experiment end to end and write its report",
                       description="Experiments: each writes OUT/report.md (+ JSON and PNG) and resumes when "
                                   "rerun with the same OUT.")
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    _register_chinchilla(esub, formatter_class)
    _register_rlhf(esub, formatter_class)


def _add_experiment(esub, formatter_class, name: str, func, **texts) -> None:
    """`llmlab experiment NAME [KEY=VALUE ...] --out OUT [--smoke]`: the arguments every experiment takes."""
    p = esub.add_parser(name, formatter_class=formatter_class, **texts)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    p.add_argument("--out", default=f"runs/{name}", help="output directory (resumed when rerun)")
    p.add_argument("--smoke", action="store_true", help="the seconds-long size the tests use")
    p.set_defaults(func=func)


def _register_chinchilla(esub, formatter_class) -> None:
    _add_experiment(
        esub, formatter_class, "chinchilla", _chinchilla,
        help="IsoFLOP sweep, Kaplan/Chinchilla fits and sizing on the built-in corpus",
        description="Train a small tokenizer and shards on the corpus, run an IsoFLOP sweep of real "
                    "pretraining runs\n(capped by sweep.max_minutes; rerun to continue), fit Kaplan's "
                    "laws and Chinchilla's three\napproaches, and plan compute- and inference-optimal "
                    "runs: OUT/report.md, report.json, fit/*.png.\nOverrides address ChinchillaConfig, "
                    "e.g. sweep.budgets=[1e12,1e13] sweep.jobs=2 vocab_size=1024.\n\n"
                    "examples:\n  llmlab experiment chinchilla --out runs/chinchilla\n"
                    "  llmlab experiment chinchilla --out runs/smoke --smoke")


def _chinchilla(args) -> int:
    from llmlab.experiments.chinchilla import run_chinchilla

    report = run_chinchilla(args.out, args.overrides, smoke=args.smoke)
    print(f"{report['done']}/{report['points']} points in {report['wall_s'] / 60:.1f} min -> "
          f"{args.out}/report.md")
    return 0


def _register_rlhf(esub, formatter_class) -> None:
    _add_experiment(
        esub, formatter_class, "rlhf", _rlhf,
        help="reward hacking: PPO with beta 0 and with a KL term, DPO and GRPO from one SFT model",
        description="From the SFT model of a cpu-chat speedrun (chat_run=runs/chat; else its stages run "
                    "here): preferences\nfrom the length-biased rater, a reward model, then PPO with beta 0 "
                    "and with beta kl_coef, DPO\nand GRPO on the graded reward, each measured on held-out "
                    "prompts: OUT/report.md, report.json,\nrlhf.png. Overrides address RLHFConfig, e.g. "
                    "rollouts=20 kl_coef=0.05 lr=1e-5.\n\n"
                    "examples:\n  llmlab experiment rlhf --out runs/rlhf\n"
                    "  llmlab experiment rlhf --out runs/smoke --smoke base_checkpoint=runs/demo/ckpt-000500")


def _rlhf(args) -> int:
    from llmlab.experiments.rlhf import run_rlhf

    report = run_rlhf(args.out, args.overrides, smoke=args.smoke)
    finals = ", ".join(f"{arm} {a['final']['accuracy']:.1%}" for arm, a in report["arms"].items())
    print(f"true accuracy: SFT {report['arms']['ppo_beta0']['curve'][0]['accuracy']:.1%}, {finals} -> "
          f"{args.out}/report.md")
    return 0
