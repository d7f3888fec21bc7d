"""`llmlab eval ...`: evaluations of one or more checkpoints (today: `eval ppl`, perplexity on shards)."""

from __future__ import annotations

import json
import sys

from llmlab.cli.options import COUNT


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
