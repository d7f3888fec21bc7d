"""`llmlab import-hf DIR OUT` and `llmlab export-hf CKPT OUT`: move models between Hugging Face and llmlab.

import-hf turns a local HF GPT-2 / Llama / Mistral / Qwen2 directory into an llmlab checkpoint (config.json,
model.safetensors, tokenizer/) that generate, sft, quantize and serve read like a trained one; export-hf
writes a checkpoint back as a directory transformers' AutoModelForCausalLM / AutoTokenizer load offline.
Reward models (scalar head) go both ways as *ForSequenceClassification models with one label (see
llmlab.model.hf), so `ppo --reward-model` takes an imported one and TRL's trainers take an exported one.
Both follow llmlab.fsutil.check_output: a non-empty OUT only with --overwrite, never one holding the input.
"""

from __future__ import annotations

_DTYPE_HELP = "fp32, bf16, fp16 or auto (bf16 on capable GPUs, else fp32); None keeps the stored dtype"
_OVERWRITE_HELP = ("replace a non-empty OUT (written beside it, then swapped in); an OUT holding the input "
                   "is always refused")


def register(sub, formatter_class) -> None:
    p = sub.add_parser("import-hf", formatter_class=formatter_class,
                       help="convert a local Hugging Face GPT-2/Llama-family model into an llmlab checkpoint",
                       description="Read DIR (config.json + model.safetensors, sharded safetensors with an "
                                   "index, or pytorch_model.bin; tokenizer.json if present) and write the "
                                   "llmlab checkpoint OUT (config.json, model.safetensors, tokenizer/). "
                                   "Supported model_type: gpt2, llama, mistral, qwen2; options llmlab cannot "
                                   "reproduce exactly (rope scaling, sliding windows, MoE) are refused. A "
                                   "*ForSequenceClassification model with one label imports as a reward "
                                   "model (scalar head).")
    p.add_argument("src", metavar="DIR", help="local Hugging Face model directory")
    p.add_argument("out", metavar="OUT", help="llmlab checkpoint directory to write (a new or empty one)")
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument("--no-tokenizer", action="store_true", help="import only the weights, not tokenizer.json")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=run_import)

    p = sub.add_parser("export-hf", formatter_class=formatter_class,
                       help="write an llmlab checkpoint as a Hugging Face model directory",
                       description="Write CKPT as OUT: config.json (GPT2Config or LlamaConfig/Qwen2Config "
                                   "fields), model.safetensors and, when the checkpoint has a tokenizer, "
                                   "tokenizer.json, tokenizer_config.json and special_tokens_map.json; "
                                   "transformers' AutoModelForCausalLM.from_pretrained(OUT) and "
                                   "AutoTokenizer load it offline. A reward model (scalar head) is written "
                                   "as *ForSequenceClassification with one label and its tokenizer's pad id "
                                   "(AutoModelForSequenceClassification loads it), so it needs the "
                                   "tokenizer.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="llmlab checkpoint directory, e.g. runs/demo/ckpt-000500")
    p.add_argument("out", metavar="OUT", help="Hugging Face directory to write (a new or empty one)")
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: CKPT/tokenizer if present)")
    p.add_argument("--no-tokenizer", action="store_true", help="export only the model")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=run_export)


def run_import(args) -> int:
    from llmlab.model.hf import import_hf

    info = import_hf(args.src, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer,
                     overwrite=args.overwrite)
    print(_summary("imported", args.src, args.out, info))
    return 0


def run_export(args) -> int:
    from llmlab.model.hf import export_hf

    info = export_hf(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                     with_tokenizer=not args.no_tokenizer, overwrite=args.overwrite)
    print(_summary("exported", args.checkpoint, args.out, info))
    return 0


def _summary(verb: str, src: str, out: str, info: dict) -> str:
    tok = "with tokenizer" if info["tokenizer"] else "no tokenizer"
    kind = "reward model" if info["head"] == "scalar" else "model"
    return (f"{verb} {info['model_type']} {kind} ({info['params'] / 1e6:.1f}M params, {info['dtype']}, "
            f"{tok}): {src} -> {out}")
