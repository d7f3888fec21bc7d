"""`llmlab serve CKPT`: an OpenAI-compatible server with a chat page; `llmlab chat CKPT`: a terminal chat."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmlab.cli.options import COUNT, SEED, TEMPERATURE, real, whole


def _engine_options(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (plain or quantized), e.g. "
                                                      "runs/demo/ckpt-000500")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory; None = CKPT/tokenizer")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, else fp32), fp32, bf16, fp16")
    p.add_argument("--kv-budget-mb", type=real(0.0, low_open=True), default=None,
                   help="memory for the paged KV cache in MiB; None = the engine's default sizing")
    p.add_argument("--max-running", type=COUNT, default=64, help="requests decoded together at most")
    p.add_argument("--block-size", type=COUNT, default=16, help="token slots per KV-cache block")
    p.add_argument("--prefill-chunk", type=COUNT, default=256,
                   help="prompt tokens prefilled per engine step, so long prompts do not stall decoding")


def register(sub, formatter_class) -> None:
    p = sub.add_parser("serve", formatter_class=formatter_class,
                       help="serve a checkpoint over the OpenAI API, with a chat page at /",
                       description="Serve CKPT with continuous batching behind an OpenAI-compatible HTTP API "
                                   "(/v1/models, /v1/completions, /v1/chat/completions; streaming with "
                                   "stream=true), /health, /metrics (Prometheus) and a chat page at /. Binds "
                                   "127.0.0.1 unless --host says otherwise. Ctrl-C stops it.")
    _engine_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (set --api-key)")
    p.add_argument("--port", type=whole(0, 65535), default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LLMLAB_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics; default: $LLMLAB_API_KEY "
                        "(none: no key needed)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send; None = CKPT's directory name")
    p.add_argument("--max-tokens", type=COUNT, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=COUNT, default=None,
                   help="longest prompt accepted, in tokens; None = the model's context")
    p.add_argument("--max-n", type=COUNT, default=8, help="largest n (choices per request)")
    p.add_argument("--max-waiting", type=COUNT, default=256,
                   help="engine requests allowed to wait for a slot; beyond, 429 with Retry-After")
    p.add_argument("--max-body-kb", type=COUNT, default=1024, help="largest request body in KiB")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs one line per request)")
    p.set_defaults(func=run_serve)

    c = sub.add_parser("chat", formatter_class=formatter_class,
                       help="chat with a checkpoint in the terminal (streaming)",
                       description="A terminal chat with CKPT, replies streamed as they are generated, the "
                                   "prompt rendered with the same chat template as `llmlab serve`. Commands: "
                                   "/reset starts over, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply.")
    _engine_options(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=TEMPERATURE, default=0.7, help="0 = greedy; higher = more random")
    c.add_argument("--top-p", type=real(0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling mass")
    c.add_argument("--top-k", type=whole(0), default=0, help="sample among the k most likely (0 = all)")
    c.add_argument("--max-tokens", type=COUNT, default=None, help="reply length limit; None = the context")
    c.add_argument("--seed", type=SEED, default=None, help="seed for reproducible replies")
    c.set_defaults(func=run_chat)


def _load(args):
    from llmlab.infer.server import load_engine

    return load_engine(args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                       kv_budget_mb=args.kv_budget_mb, max_running=args.max_running,
                       block_size=args.block_size, prefill_chunk=args.prefill_chunk)


def run_serve(args) -> int:
    from llmlab.infer.server import Limits, listen, serve

    limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_n=args.max_n, max_waiting=args.max_waiting)
    limits.check()
    listen(args.host, args.port).close()  # a taken port fails now, before the model loads
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"llmlab: warning: serving on {args.host} without --api-key: anyone who can reach it may "
              "use it", file=sys.stderr)
    engine, tok = _load(args)
    name = args.model_name or Path(args.checkpoint).resolve().name
    serve(engine, tok, model_name=name, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          log_level=args.log_level, announce=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def run_chat(args) -> int:
    from llmlab.errors import LLMLabError

    engine, tok = _load(args)
    params = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None, seed=args.seed,
                  max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    tty = sys.stdin.isatty()
    if tty:
        print("llmlab chat: /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply",
              file=sys.stderr)
    engine.start()
    try:
        while True:
            try:
                line = input("you> " if tty else "")
            except EOFError:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/reset":
                messages = list(system)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            try:
                messages.append({"role": "assistant", "content": _reply(engine, tok, messages, params, tty)})
            except LLMLabError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
                messages.pop()
                print(f"llmlab: {' '.join(str(e).split())}", file=sys.stderr)
    finally:
        engine.stop()
    return 0


def _reply(engine, tok, messages, params, tty: bool) -> str:
    """Stream one reply to stdout; Ctrl-C cancels it and keeps what was said so far."""
    from llmlab.infer.server import chat_reply

    handle, pieces = chat_reply(engine, tok, messages, params)
    reply = ""
    if tty:
        sys.stdout.write("bot> ")
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply += piece
    except KeyboardInterrupt:
        handle.cancel()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return reply
