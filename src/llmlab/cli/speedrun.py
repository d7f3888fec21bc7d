"""`llmlab speedrun`: tokenizer, shards, pretraining, evaluation and a report in one command."""

from __future__ import annotations


def register(sub, formatter_class) -> None:
    from llmlab.config import preset_names

    p = sub.add_parser(
        "speedrun", formatter_class=formatter_class,
        help="train a tokenizer and a model end to end, with a report",
        description="Train a tokenizer on the corpus, prepare shards, pretrain, evaluate and write "
                    "OUT/report.md.\nEach stage is skipped when its output is already complete. Overrides "
                    "address the preset's\nkeys, e.g. pretrain.optim.max_steps=200 tokenizer.vocab_size=2048 "
                    "corpus.sources=[\"a.txt\"].\n\n"
                    f"presets: {', '.join(preset_names('llmlab.presets'))}\n\n"
                    "examples:\n  llmlab speedrun                                   # cpu-demo into "
                    "runs/demo\n  llmlab speedrun --preset cpu-chat                 # SFT, reward model, "
                    "DPO into runs/chat\n  llmlab speedrun --preset gpt2-124M --out runs/gpt2  # on a GPU")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="preset overrides (TOML literals)")
    p.add_argument("--preset", default="cpu-demo", help="a preset name or a speedrun TOML file")
    p.add_argument("--out", default=None,
                   help="output directory (tokenizer, shards, checkpoints, report); default runs/demo, or "
                        "runs/chat for a post-training preset such as cpu-chat")
    p.add_argument("--overwrite", action="store_true",
                   help="also write into an OUT that holds files other than a speedrun's (they stay; each "
                        "stage replaces only its own output). An earlier speedrun's OUT is resumed stage by "
                        "stage without it")
    p.set_defaults(func=_speedrun)


def _speedrun(args) -> int:
    from llmlab.speedrun import run_speedrun
    from llmlab.speedrun_chat import is_chat_preset, run_chat_speedrun

    if is_chat_preset(args.preset):
        out = args.out or "runs/chat"
        fig = run_chat_speedrun(args.preset, out, args.overrides, overwrite=args.overwrite)
        acc = {m: fig["accuracy"][m]["overall"]["accuracy"] for m in ("base", "sft", "dpo")}
        print(f"task accuracy: base {acc['base']:.1%}, SFT {acc['sft']:.1%}, DPO {acc['dpo']:.1%}; reward "
              f"model {fig['reward_model']['label_accuracy']:.1%} on held-out pairs -> {out}/report.md")
        return 0
    args.out = args.out or "runs/demo"
    fig = run_speedrun(args.preset, args.out, args.overrides, overwrite=args.overwrite)
    print(f"val loss {fig['val_loss']:.4f} nats/token (unigram baseline {fig['unigram_loss']:.4f}), "
          f"{fig['bits_per_byte']:.3f} bits/byte, {fig['tokens_per_s']:,.0f} tokens/s "
          f"-> {args.out}/report.md")
    return 0
