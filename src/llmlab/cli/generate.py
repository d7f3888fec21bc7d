"""`llmlab generate CKPT --prompt TEXT`: continue a prompt with a trained checkpoint and print the text."""

from __future__ import annotations

import sys

from llmlab.cli.options import COUNT, SEED, TEMPERATURE, real, whole


def register(sub, formatter_class) -> None:
    p = sub.add_parser("generate", formatter_class=formatter_class,
                       help="continue a prompt with a checkpoint (KV-cached sampling)",
                       description="Load CKPT (config.json + model.safetensors) and its tokenizer, continue "
                                   "--prompt, print the text. Temperature 0 is greedy decoding.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, e.g. runs/demo/ckpt-000500")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=COUNT, default=None,
                   help="tokens to generate; None = up to 256, within the model's context")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=whole(0), default=50,
                   help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=real(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling mass, e.g. 0.95")
    p.add_argument("--seed", type=SEED, default=None, help="seed for reproducible sampling")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory; None = CKPT/tokenizer")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--no-doc-start", action="store_true",
                   help="do not prepend the end-of-document token that marks the start of a document")
    p.add_argument("--draft", default=None,
                   help="draft checkpoint (same tokenizer, smaller model) for speculative decoding: same "
                        "output distribution, fewer target forward passes")
    p.add_argument("--lookup", action="store_true",
                   help="speculative decoding by prompt lookup: propose the tokens that followed the last "
                        "earlier occurrence of the context's final n-gram; draft-free alone, and with "
                        "--draft the draft proposes in the rounds where lookup finds no match")
    p.add_argument("--speculate-k", type=COUNT, default=4,
                   help="tokens proposed per speculative round (with --draft or --lookup)")
    p.add_argument("--draft-confidence", type=real(0.0, 1.0), default=None,
                   help="with --draft: stop a round's guesses where the draft's top probability falls below "
                        "this (e.g. 0.5); unlikely guesses then cost no verification work")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, else fp32), fp32, bf16, fp16")
    p.add_argument("--cpu-routes", action="store_true",
                   help="on CPU, let each linear take the matmul route measured fastest per shape on this "
                        "machine (llmlab.infer.cpu_linear); off: plain F.linear")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmlab.infer.generate import complete

    pieces = complete(args.checkpoint, args.prompt, tokenizer=args.tokenizer,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, stream_text=args.stream,
                      stop_at_eos=not args.ignore_eos, doc_start=not args.no_doc_start, draft=args.draft,
                      speculate_k=args.speculate_k, draft_confidence=args.draft_confidence,
                      lookup=args.lookup, device=args.device, dtype=args.dtype,
                      cpu_routes=args.cpu_routes)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        if args.stream:
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
