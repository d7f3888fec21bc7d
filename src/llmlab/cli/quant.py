"""`llmlab quantize CKPT --out DIR ...`: int8/int4 weight quantization with RTN, GPTQ or AWQ."""

from __future__ import annotations

import json

from llmlab.cli.options import COUNT, SEED
from llmlab.errors import ConfigError


def register(sub, formatter_class) -> None:
    p = sub.add_parser("quantize", formatter_class=formatter_class,
                       help="quantize a checkpoint's linear layers to int8 or int4 (RTN, GPTQ, AWQ)",
                       description="Load CKPT, quantize every linear layer of its Transformer blocks (the "
                                   "embeddings and LM head stay in full precision unless --include-head), "
                                   "write a checkpoint that `llmlab generate` / `llmlab eval ppl` load as "
                                   "is.")
    p.add_argument("checkpoint", metavar="CKPT", help="full-precision checkpoint directory")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--method", default="rtn", help="rtn (no data), gptq (Frantar et al. 2022) or awq "
                                                    "(Lin et al. 2023)")
    p.add_argument("--bits", type=int, default=8, help="8 (per-channel int8) or 4 (group-wise int4)")
    p.add_argument("--group-size", type=COUNT, default=128,
                   help="int4: input columns per scale/zero point; must divide every layer's input width")
    p.add_argument("--calib", default=None,
                   help="GPTQ/AWQ calibration data: prepared shard dir (train split), a .bin shard, a .npy "
                        "token array, or text; none = the built-in stdlib corpus")
    p.add_argument("--calib-samples", type=COUNT, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=COUNT, default=None,
                   help="tokens per calibration window; none = min(256, block_size)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.add_argument("--awq-no-clip", action="store_true",
                   help="AWQ: skip the clipping search (measured better on small models; see "
                        "infer/quant/awq.py)")
    p.add_argument("--include-head", action="store_true", help="also quantize an untied LM head")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory; none = CKPT/tokenizer")
    p.add_argument("--seed", type=SEED, default=0, help="seed for drawing calibration windows")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (written beside it, then swapped in); never the input")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from llmlab.infer.quant import quantize_checkpoint

    if args.awq_no_clip and args.method != "awq":
        raise ConfigError(f"--awq-no-clip applies to --method awq, not {args.method}; drop it or use "
                          "--method awq")
    options = {"clip": False} if args.awq_no_clip else {}
    summary = quantize_checkpoint(args.checkpoint, args.out, args.method, args.bits, args.group_size,
                                  calib_source=args.calib, calib_samples=args.calib_samples,
                                  calib_len=args.calib_len, seed=args.seed, act_order=args.act_order,
                                  include_head=args.include_head, tokenizer=args.tokenizer,
                                  device=args.device, overwrite=args.overwrite, **options)
    print(json.dumps(summary))
    return 0
