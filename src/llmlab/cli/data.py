"""`llmlab data prepare | generate | tasks | preferences | info`: turn text (or a model's own continuations)
into token shards and describe them; write verifiable tasks and simulated-rater preference pairs."""

from __future__ import annotations

import json

from llmlab.cli.options import COUNT, SEED, TEMPERATURE, real, whole
from llmlab.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION


def register(sub, formatter_class) -> None:
    data = sub.add_parser("data", help="tokenize text into shards and inspect them",
                          formatter_class=formatter_class,
                          description="Turn text sources into train/val token shards for pretraining.")
    verbs = data.add_subparsers(dest="data_verb", metavar="ACTION")

    p = verbs.add_parser(
        "prepare", formatter_class=formatter_class, help="tokenize sources into train/val shards",
        description="Tokenize SOURCES (.txt/.jsonl/.parquet files, globs, directories, or 'stdlib' for the "
                    "built-in corpus) into OUT/{train,val}_NNNNN.bin plus meta.json.\nRe-running with the "
                    "same inputs reuses finished shards.\n\nexample: llmlab data prepare stdlib "
                    "--tokenizer tok --out shards")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files, globs, directories or 'stdlib'")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer directory (llmlab tokenizer train)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    p.add_argument("--shard-tokens", type=COUNT, default=DEFAULT_SHARD_TOKENS,
                   help="a shard closes at the first document end after this many tokens")
    p.add_argument("--val-fraction", type=real(0.0, 1.0, high_open=True), default=DEFAULT_VAL_FRACTION,
                   help="fraction of documents held out for validation (chosen by hash of seed and index)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the train/val split")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--max-chars", type=COUNT, default=None, help="stop after this many characters")
    p.add_argument("--workers", type=COUNT, default=None,
                   help="tokenizer processes; unset means all CPUs, or in-process for inputs under 1 MB")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards of a different preparation in OUT (shards of this one are resumed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_prepare)

    g = verbs.add_parser(
        "generate", formatter_class=formatter_class,
        help="shards of a model's own continuations (draft data)",
        description="Draw prompts from SHARDS and write the checkpoint's continuations as a new shard "
                    "directory: training data for a speculative draft that imitates the model "
                    "(llmlab/infer/continuations.py).\n\nexample: llmlab data generate "
                    "runs/big/ckpt-000700 --shards shards --out big-text --sequences 4096\n"
                    "         llmlab pretrain --config cpu-demo data.shards=big-text "
                    "train.run_name=draft model.n_layer=1 model.d_model=128 model.n_head=2")
    g.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory of the model to imitate")
    g.add_argument("--shards", required=True, metavar="DIR", help="shard directory to draw prompts from")
    g.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    g.add_argument("--sequences", type=COUNT, default=4096,
                   help="train sequences (prompts from the train split)")
    g.add_argument("--val-sequences", type=whole(0), default=None,
                   help="val sequences from val-split prompts (default: sequences / 32, at least 1)")
    g.add_argument("--prompt-tokens", type=COUNT, default=32,
                   help="tokens of source text opening each sequence")
    g.add_argument("--length", type=whole(2), default=256, help="tokens per sequence, prompt included")
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                   help="0 = greedy continuations (for greedy drafts)")
    g.add_argument("--batch-size", type=COUNT, default=64, help="prompts continued together")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the prompt positions and of sampling")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT (written beside it, then swapped in); never an input")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=_generate)

    _register_tasks(verbs, formatter_class)
    _register_preferences(verbs, formatter_class)

    i = verbs.add_parser("info", formatter_class=formatter_class,
                         help="token counts, dtype and splits of a shard dir",
                         description="Check every shard header in DIR and print token counts, dtype and "
                                     "split sizes.")
    i.add_argument("dir", metavar="DIR", help="a directory made by `llmlab data prepare`")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_info)


def _prepare(args) -> int:
    from llmlab.data.prepare import prepare_shards

    meta = prepare_shards(args.sources, args.tokenizer, args.out, shard_tokens=args.shard_tokens,
                          val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                          max_chars=args.max_chars, workers=args.workers, progress=not args.no_progress,
                          overwrite=args.overwrite)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{args.out}: {meta['tokens']:,} tokens ({meta['dtype']}) from {meta['documents']:,} documents; "
          f"train {train['tokens']:,} in {len(train['shards'])} shard(s), "
          f"val {val['tokens']:,} in {len(val['shards'])} shard(s)")
    if meta["options"]["val_fraction"] > 0 and not val["tokens"]:
        print("note: no document fell in the val split; raise --val-fraction or add documents")
    return 0


def _generate(args) -> int:
    from llmlab.infer.continuations import write_continuations

    meta = write_continuations(args.checkpoint, args.shards, args.out, sequences=args.sequences,
                               val_sequences=args.val_sequences, prompt_tokens=args.prompt_tokens,
                               length=args.length, temperature=args.temperature, batch_size=args.batch_size,
                               seed=args.seed, device=args.device, overwrite=args.overwrite,
                               progress=not args.no_progress)
    made, splits = meta["generated"], meta["splits"]
    print(f"{args.out}: {made['sequences']['train']:,} train / {made['sequences']['val']:,} val sequences of "
          f"{made['length']} tokens ({splits['train']['tokens']:,} / {splits['val']['tokens']:,} tokens), "
          f"continued by {args.checkpoint} at {made['tokens_per_s']:,.0f} tok/s")
    return 0


def _register_tasks(verbs, formatter_class) -> None:
    t = verbs.add_parser(
        "tasks", formatter_class=formatter_class, help="verifiable tasks as SFT data and prompt sets",
        description="Write problems a program can check (add, mul, count, reverse, sort, lookup; "
                    "llmlab/data/tasks.py) into OUT:\n  train.jsonl          SFT data ({\"messages\": ...})\n"
                    "  train_prompts.jsonl  train-split prompts (for `llmlab data preferences`)\n"
                    "  test_prompts.jsonl   test-split prompts (for `llmlab eval tasks`)\n"
                    "  tasks.json           settings and counts\nTrain and test problems are disjoint by "
                    "construction (a hash of each problem decides its split).\n\n"
                    "example: llmlab data tasks --out data/tasks --train 2000 --test 200 "
                    "--difficulty add=3,sort=5")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    t.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    t.add_argument("--train", type=COUNT, default=1000, help="SFT examples per task")
    t.add_argument("--test", type=COUNT, default=100, help="test prompts (distinct problems) per task")
    t.add_argument("--difficulty", default=None, metavar="TASK=N,...",
                   help="difficulty per task (digits, letters, list length, pairs); unnamed tasks keep "
                        "their default")
    t.add_argument("--seed", type=SEED, default=0, help="which problems of each split are drawn")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    t.set_defaults(func=_tasks)


def _register_preferences(verbs, formatter_class) -> None:
    p = verbs.add_parser(
        "preferences", formatter_class=formatter_class,
        help="preference pairs from a model's samples and a simulated rater",
        description="Sample several answers per prompt from CKPT (chat template, stop at end of turn) and "
                    "label pairs with a simulated rater, a stand-in for human raters:\n"
                    "  correct  prefers a correct answer to a wrong one (pairs only where the samples "
                    "disagree), each label flipped with probability --noise\n"
                    "  length   prefers the longer answer whatever it says (the length bias real reward "
                    "models learn)\nWrites {\"prompt\", \"chosen\", \"rejected\"} message lists, one "
                    "JSON object per line (what `llmlab reward train` and `llmlab dpo` read).\n\n"
                    "example: llmlab data preferences runs/sft/ckpt-000400 --prompts "
                    "data/tasks/train_prompts.jsonl --out data/prefs.jsonl")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint that samples the answers")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompt set (train_prompts.jsonl of `llmlab data tasks`)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .jsonl file")
    p.add_argument("--rater", default="correct", choices=["correct", "length"], help="the simulated rater")
    p.add_argument("--noise", type=real(0.0, 0.5), default=0.1,
                   help="probability that a label is flipped (rater noise)")
    p.add_argument("--samples", type=whole(2), default=4, help="answers sampled per prompt")
    p.add_argument("--temperature", type=real(0.0, low_open=True), default=1.0, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=COUNT, default=24, help="longest answer in tokens")
    p.add_argument("--batch-size", type=COUNT, default=64, help="sequences sampled together")
    p.add_argument("--seed", type=SEED, default=0, help="seed of sampling and of the rater's noise")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_preferences)


def _tasks(args) -> int:
    from llmlab.data.tasks import parse_difficulty, parse_task_names, write_task_data
    from llmlab.fsutil import check_output

    tasks = parse_task_names(args.tasks)
    difficulty = parse_difficulty(args.difficulty)
    check_output(args.out, overwrite=args.overwrite, into=True, what="--out")
    meta = write_task_data(args.out, tasks, args.train, args.test, difficulty, seed=args.seed)
    levels = ", ".join(f"{t}={d}" for t, d in meta["difficulty"].items())
    files = ", ".join(f"{name} ({n:,})" for name, n in meta["files"].items())
    print(f"{args.out}: {files}; difficulty {levels}")
    return 0


def _preferences(args) -> int:
    from llmlab.align.preferences import write_preferences

    stats = write_preferences(args.checkpoint, args.prompts, args.out, rater=args.rater, noise=args.noise,
                              samples=args.samples, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              seed=args.seed, device=args.device, overwrite=args.overwrite)
    print(f"{args.out}: {stats['pairs']:,} pairs from {stats['prompts']:,} prompts ({stats['ties']:,} "
          f"without a preference: all samples equally good to the {args.rater} rater); "
          f"{stats['flipped']:,} labels flipped by noise; sample accuracy {stats['sample_accuracy']:.1%}")
    return 0


def _info(args) -> int:
    from llmlab.data.shards import describe_shards

    info = describe_shards(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_info(info))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def format_info(info: dict) -> str:
    """The human-readable table of `llmlab data info`."""
    lines = [f"{info['dir']}  (fingerprint {info['fingerprint']})",
             f"  tokenizer   vocab {info['vocab_size']:,}, eos id {info['eos_id']}, "
             f"tokens stored as {info['dtype']}"]
    for s in info["sources"]:
        extra = f" + {s['topics']} topics" if "topics" in s else ""
        lines.append(f"  source      {s['source']} ({s['kind']}, {s['files']} files{extra}, "
                     f"{_mib(s['bytes'])})")
    cpt = f", {info['chars_per_token']} chars/token" if info["chars_per_token"] else ""
    if info["characters"]:  # shards written from token arrays (write_shard_dir) have no text statistics
        lines.append(f"  documents   {info['documents']:,} ({info['characters']:,} chars{cpt})")
    lines.append(f"  {'split':<8}{'shards':>8}{'tokens':>16}{'documents':>12}{'size':>14}")
    total = {"shards": 0, "tokens": 0, "documents": 0, "bytes": 0}
    for name, s in info["splits"].items():
        lines.append(f"  {name:<8}{s['shards']:>8}{s['tokens']:>16,}{s['documents']:>12,}"
                     f"{_mib(s['bytes']):>14}")
        total = {k: total[k] + s[k] for k in total}
    lines.append(f"  {'total':<8}{total['shards']:>8}{total['tokens']:>16,}{total['documents']:>12,}"
                 f"{_mib(total['bytes']):>14}")
    return "\n".join(lines)
