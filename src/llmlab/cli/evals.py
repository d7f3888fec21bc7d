"""`llmlab eval ...`: evaluations of one or more checkpoints: `eval ppl` (perplexity on shards), `eval tasks`
(accuracy on the verifiable tasks)."""

from __future__ import annotations

import json
import sys

from llmlab.cli.options import COUNT, SEED


def register(sub, formatter_class) -> None:
    e = sub.add_parser("eval", formatter_class=formatter_class, help="evaluate checkpoints (perplexity, ...)",
                       description="Evaluations of one or more checkpoints.")
    esub = e.add_subparsers(dest="eval_verb", metavar="EVAL")
    ppl = esub.add_parser("ppl", formatter_class=formatter_class, help="perplexity on held-out shards",
                          description="Perplexity (exp of the mean next-token NLL) of each CKPT on the same "
                                      "windows of a shard directory's val split, with file sizes: compares "
                                      "full-precision and quantized checkpoints.")
    ppl.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint directories")
    ppl.add_argument("--data", required=True, help="prepared shard directory (llmlab data prepare)")
    ppl.add_argument("--split", default="val", choices=["val", "train"], help="val (held out) or train")
    ppl.add_argument("--block-size", type=COUNT, default=None,
                     help="window length; none = the smallest context")
    ppl.add_argument("--batch-size", type=COUNT, default=8, help="windows per forward pass")
    ppl.add_argument("--max-batches", type=COUNT, default=None, help="evaluate only the first N batches")
    ppl.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    ppl.add_argument("--dtype", default=None, help="fp32, bf16 or fp16; none = as stored")
    ppl.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    ppl.add_argument("--cpu-routes", action="store_true",
                     help="on CPU, let each linear take the matmul route measured fastest per shape on this "
                          "machine (llmlab.infer.cpu_linear); off: plain F.linear")
    ppl.set_defaults(func=run_ppl)
    _register_tasks(esub, formatter_class)


def _register_tasks(esub, formatter_class) -> None:
    t = esub.add_parser(
        "tasks", formatter_class=formatter_class, help="accuracy on the verifiable tasks",
        description="Greedy answers of each CKPT to task prompts (chat template, stop at end of turn), "
                    "graded exactly: accuracy per task with n and a 95% Wilson interval, as JSON on "
                    "stdout (and --out), plus a bar chart (--plot, default OUT with .png).\nPrompts come "
                    "from --prompts (test_prompts.jsonl of `llmlab data tasks`) or are made: --n test "
                    "prompts per task.\n\nexample: llmlab eval tasks runs/base/ckpt-000600 "
                    "runs/sft/ckpt-000400 --out tasks.json")
    t.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint directories")
    t.add_argument("--prompts", default=None, metavar="FILE", help="prompt set; default: made from --tasks")
    t.add_argument("--tasks", default="all", help="comma-separated task names, or all (without --prompts)")
    t.add_argument("--n", type=COUNT, default=100, help="test prompts per task (without --prompts)")
    t.add_argument("--difficulty", default=None, metavar="TASK=N,...",
                   help="difficulty per task (without --prompts); unnamed tasks keep their default")
    t.add_argument("--seed", type=SEED, default=0, help="which test problems are drawn (without --prompts)")
    t.add_argument("--batch-size", type=COUNT, default=64, help="prompts answered together")
    t.add_argument("--max-new-tokens", type=COUNT, default=None,
                   help="longest answer; none = twice the longest right answer's tokens + 4")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    t.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    t.add_argument("--plot", default=None, metavar="PNG", help="bar chart path (default: OUT with .png)")
    t.set_defaults(func=run_tasks)


def run_tasks(args) -> int:
    from pathlib import Path

    from llmlab.evals.tasks import evaluate_task_checkpoints, plot_task_accuracy, task_examples
    from llmlab.fsutil import check_output, write_text_atomic

    inputs = [*args.checkpoints, args.prompts]
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    for path, what in ((args.out, "--out"), (plot, "--plot")):
        if path:
            check_output(path, inputs=inputs, overwrite=True, what=what)
    examples = task_examples(args.prompts, args.tasks, args.n, args.difficulty, args.seed)
    rows = evaluate_task_checkpoints(args.checkpoints, examples, args.batch_size, args.max_new_tokens,
                                     args.device, log=lambda line: print(line, file=sys.stderr))
    text = json.dumps({"results": rows}, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    if plot:
        plot_task_accuracy(rows, plot)
    print(text)
    return 0


def run_ppl(args) -> int:
    from llmlab.evals.perplexity import evaluate_checkpoints

    rows = evaluate_checkpoints(args.checkpoints, args.data, split=args.split, block_size=args.block_size,
                                batch_size=args.batch_size, max_batches=args.max_batches, device=args.device,
                                dtype=args.dtype, cpu_routes=args.cpu_routes)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    base = rows[0]
    out = sys.stdout
    out.write(f"{'checkpoint':<40} {'ppl':>10} {'vs first':>9} {'MB':>8}  scheme\n")
    for row in rows:
        q = row["quantization"]
        scheme = "full precision" if not q else f"{q['method']} int{q['bits']}" + (
            f" g{q['group_size']}" if q.get("group_size") else "")
        rel = row["ppl"] / base["ppl"] - 1
        out.write(f"{row['checkpoint']:<40} {row['ppl']:>10.4f} {rel:>+8.2%} "
                  f"{row['file_bytes'] / 1e6:>8.2f}  {scheme}\n")
    out.write(f"({rows[0]['tokens']} tokens of the {args.split} split, windows of {rows[0]['block_size']})\n")
    return 0
