"""`llmlab quantize CKPT --out DIR ...` (int8/int4 with RTN, GPTQ or AWQ) and `llmlab eval ppl CKPT...`."""

from __future__ import annotations

import json
import sys


def register(sub, formatter_class) -> None:
    p = sub.add_parser("quantize", formatter_class=formatter_class,
                       help="quantize a checkpoint's linear layers to int8 or int4 (RTN, GPTQ, AWQ)",
                       description="Load CKPT, quantize every linear layer of its Transformer blocks (the "
                                   "embeddings and LM head stay in full precision unless --include-head), "
                                   "write a checkpoint that `llmlab generate` / `llmlab eval ppl` load as is.")
    p.add_argument("checkpoint", metavar="CKPT", help="full-precision checkpoint directory")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--method", default="rtn", help="rtn (no data), gptq (Frantar et al. 2022) or awq "
                                                    "(Lin et al. 2023)")
    p.add_argument("--bits", type=int, default=8, help="8 (per-channel int8) or 4 (group-wise int4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4: input columns per scale/zero point; must divide every layer's input width")
    p.add_argument("--calib", default=None, help="GPTQ/AWQ calibration data: prepared shard dir (train split), "
                                                 "a .bin shard, a .npy token array, or text; none = the built-in stdlib corpus")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=None,
                   help="tokens per calibration window; none = min(256, block_size)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.add_argument("--include-head", action="store_true", help="also quantize an untied LM head")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory; none = CKPT/tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_quantize)

    e = sub.add_parser("eval", formatter_class=formatter_class, help="evaluate checkpoints (perplexity, ...)",
                       description="Evaluations of one or more checkpoints.")
    esub = e.add_subparsers(dest="eval_verb", metavar="EVAL")
    ppl = esub.add_parser("ppl", formatter_class=formatter_class, help="perplexity on held-out shards",
                          description="Perplexity (exp of the mean next-token NLL) of each CKPT on the same "
                                      "windows of a shard directory's val split, with file sizes: compares "
                                      "full-precision and quantized checkpoints.")
    ppl.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint directories")
    ppl.add_argument("--data", required=True, help="prepared shard directory (llmlab data prepare)")
    ppl.add_argument("--split", default="val", help="val (held out) or train")
    ppl.add_argument("--block-size", type=int, default=None, help="window length; none = the smallest context")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ppl.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    ppl.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    ppl.add_argument("--dtype", default=None, help="fp32, bf16 or fp16; none = as stored")
    ppl.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    ppl.set_defaults(func=run_ppl)
    e.set_defaults(func=lambda args: _eval_help(e))


def _eval_help(parser) -> int:
    parser.print_help()
    return 2


def run_quantize(args) -> int:
    from llmlab.infer.quant import quantize_checkpoint

    summary = quantize_checkpoint(args.checkpoint, args.out, args.method, args.bits, args.group_size,
                                  calib_source=args.calib, calib_samples=args.calib_samples,
                                  calib_len=args.calib_len, seed=args.seed, act_order=args.act_order,
                                  include_head=args.include_head, tokenizer=args.tokenizer, device=args.device,
                                  overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def run_ppl(args) -> int:
    from llmlab.evals.perplexity import evaluate_checkpoints

    rows = evaluate_checkpoints(args.checkpoints, args.data, split=args.split, block_size=args.block_size,
                                batch_size=args.batch_size, max_batches=args.max_batches, device=args.device,
                                dtype=args.dtype)
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
        out.write(f"{row['checkpoint']:<40} {row['ppl']:>10.4f} {rel:>+8.2%} {row['file_bytes'] / 1e6:>8.2f}  "
                  f"{scheme}\n")
    out.write(f"({rows[0]['tokens']} tokens of the {args.split} split, windows of {rows[0]['block_size']})\n")
    return 0
