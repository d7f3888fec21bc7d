r"""The batching engine against one request at a time and static batching, in-process (no HTTP), greedy.

    python benchmarks/bench_engine.py                 # random-init GPT-2 "mini" (4 x 256), 1 thread
    python benchmarks/bench_engine.py --checkpoint runs/demo/ckpt-600 --requests 128 --concurrency 32 \
        --threads 4 --clock wall

All requests arrive at once; prompt lengths are uniform in [--prompt-min, --prompt-max] and output lengths
mixed (a share --long-share of long answers, the rest short), fixed by max_tokens (no stop tokens), the same
requests for every mode:
  one_at_a_time  llmlab.infer.generate per request, on the first --one-subset requests (its tokens/s does
                 not depend on how many there are);
  static         batches of --concurrency requests in arrival order, each run with llmlab.infer.stream until
                 its longest request is done (only requested tokens count);
  continuous     llmlab.infer.engine.Engine(max_running=--concurrency), stepped until every request is done.
Figures: tokens/s (requested new tokens / time), time to first token (from arrival) p50/p99, per-token
latency (a request's time from first to last token / (tokens - 1)) p50/p99, peak KV blocks and the final
size of the engine's contiguous decode copies (decode_slots_mb, on top of the pool). Time is the
process's CPU time by default (--clock cpu, with --threads 1): everything runs in this one thread, so it is
a clock that other processes' load on a shared machine does not stretch; --clock wall for real latency.
Shared-prefix variant: --concurrency requests that share a --system-len token system prompt, run by the
engine with and without prefix caching; time to first token p50 compared.
Greedy outputs of the engine are compared with static batching's (all requests) and with one-at-a-time's
(the subset). Without --checkpoint the model is random-init with its LM head scaled by 5, so argmax margins
are clear and the comparison is meaningful.

Targets: continuous >= 3x one_at_a_time and >= 1.5x static tokens/s; continuous p99 time to first token
<= static's; prefix caching >= 2x faster p50 time to first token on the shared prompt; greedy identical.
Prints one JSON object ending with `targets`; exit 1 when one is missed (0 with --no-check).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from llmlab.infer import generate, stream
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.infer.engine.paged import KVPool
from llmlab.infer.quant import load_model
from llmlab.model import ModelConfig, Transformer
from targets import add_no_check, finish, goal

clock = time.process_time  # main() picks the clock


def make_model(checkpoint: str | None) -> Transformer:
    if checkpoint:
        return load_model(checkpoint).eval()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "mini")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model


def make_requests(args, vocab: int, block_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.requests):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        lo, hi = (args.long_min, args.long_max) if rng.random() < args.long_share else (args.short_min,
                                                                                        args.short_max)
        requests.append((prompt, min(rng.randint(lo, hi), block_size - len(prompt))))
    return requests


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summary(tokens: int, wall: float, ttft: list[float], tpot: list[float]) -> dict:
    return {"tokens_per_s": tokens / wall, "time_s": wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50) if tpot else None, "tpot_p99_s": pct(tpot, 99) if tpot else None}


@torch.inference_mode()
def run_one_at_a_time(model, requests) -> tuple[dict, list[list[int]]]:
    outs, start = [], clock()
    for prompt, n in requests:
        outs.append(generate(model, prompt, n, temperature=0).tolist()[len(prompt):])
    wall = clock() - start
    return {"tokens_per_s": sum(n for _, n in requests) / wall, "time_s": wall,
            "requests": len(requests)}, outs


@torch.inference_mode()
def run_static(model, requests, batch_size: int) -> tuple[dict, list[list[int]]]:
    outs, ttft, tpot = [], [], []
    start = clock()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        longest = max(n for _, n in batch)
        steps, first = [], None
        for tok in stream(model, [p for p, _ in batch], longest, temperature=0):
            steps.append(tok)
            first = first or clock()
        end = clock()
        new = torch.stack(steps, dim=1).tolist()
        outs += [row[:n] for row, (_, n) in zip(new, batch, strict=True)]
        ttft += [first - start] * len(batch)
        tpot += [(end - first) / (longest - 1)] * len(batch) if longest > 1 else []
    wall = clock() - start
    return summary(sum(n for _, n in requests), wall, ttft, tpot), outs


def run_continuous(model, requests, concurrency: int, prefill_chunk: int,
                   prefix_caching: bool = True) -> tuple[dict, list[list[int]]]:
    engine = Engine(model, block_size=16, max_running=concurrency, prefill_chunk=prefill_chunk,
                    prefix_caching=prefix_caching)
    start = clock()
    handles = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in requests]
    first, last, peak = [None] * len(handles), [None] * len(handles), 0
    while engine.step():
        now = clock()
        peak = max(peak, engine.stats()["blocks_used"])
        for i, h in enumerate(handles):
            if first[i] is None and h.num_generated:
                first[i] = now
            if last[i] is None and h.done:
                last[i] = now
    wall = clock() - start
    outs = [h.result().token_ids for h in handles]
    ttft = [f - start for f in first]
    tpot = [(e - f) / (n - 1) for f, e, (_, n) in zip(first, last, requests, strict=True) if n > 1]
    result = summary(sum(n for _, n in requests), wall, ttft, tpot)
    stats = engine.stats()
    slots = engine.slots
    slots_mb = slots.rows * slots.width * slots.bytes_per_row_position / 2**20 if slots else 0.0
    result.update(peak_kv_blocks=peak, peak_kv_mb=peak * KVPool.bytes_per_block(model, 16) / 2**20,
                  decode_slots_mb=slots_mb,
                  steps=stats["steps"], prefix_hit_tokens=stats["prefix_hit_tokens"])
    return result, outs


def shared_prefix_requests(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed + 1)
    system = [rng.randrange(vocab) for _ in range(args.system_len)]
    return [(system + [rng.randrange(vocab) for _ in range(rng.randint(8, 32))], rng.randint(8, 32))
            for _ in range(args.concurrency)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="llmlab checkpoint (default: random-init mini)")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32, help="engine max_running = static batch size")
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=96)
    ap.add_argument("--short-min", type=int, default=8)
    ap.add_argument("--short-max", type=int, default=32)
    ap.add_argument("--long-min", type=int, default=64)
    ap.add_argument("--long-max", type=int, default=128)
    ap.add_argument("--long-share", type=float, default=0.25)
    ap.add_argument("--one-subset", type=int, default=12)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--system-len", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="process CPU time (steady on a shared machine; needs --threads 1) or wall time")
    ap.add_argument("--seed", type=int, default=0)
    add_no_check(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model = make_model(args.checkpoint)
    cfg = model.config
    requests = make_requests(args, cfg.vocab_size, cfg.block_size)
    print(f"{len(requests)} requests, {sum(n for _, n in requests)} new tokens", file=sys.stderr)

    continuous, cont_out = run_continuous(model, requests, args.concurrency, args.prefill_chunk)
    static, static_out = run_static(model, requests, args.concurrency)
    one, one_out = run_one_at_a_time(model, requests[:args.one_subset])
    shared = shared_prefix_requests(args, cfg.vocab_size)
    cached, cached_out = run_continuous(model, shared, args.concurrency, args.prefill_chunk)
    uncached, uncached_out = run_continuous(model, shared, args.concurrency, args.prefill_chunk,
                                            prefix_caching=False)
    identical = (cont_out == static_out and cont_out[:len(one_out)] == one_out and cached_out == uncached_out)
    mismatches = sum(a != b for a, b in zip(cont_out, static_out, strict=True))
    result = {
        "benchmark": "engine", "model": args.checkpoint or "random-init gpt2 mini (lm_head x5)",
        "params_M": model.num_params() / 1e6, "threads": args.threads, "clock": args.clock,
        "requests": len(requests),
        "concurrency": args.concurrency, "new_tokens": sum(n for _, n in requests),
        "continuous": continuous, "static": static, "one_at_a_time": one,
        "shared_prefix": {"system_len": args.system_len, "cached": cached, "uncached": uncached},
        "greedy_mismatches_vs_static": mismatches,
        "speedup_vs_one": continuous["tokens_per_s"] / one["tokens_per_s"],
        "speedup_vs_static": continuous["tokens_per_s"] / static["tokens_per_s"],
        "prefix_ttft_speedup": uncached["ttft_p50_s"] / cached["ttft_p50_s"],
    }
    targets = {
        "speedup_vs_one_at_a_time": goal(round(result["speedup_vs_one"], 2), ">=", 3.0),
        "speedup_vs_static": goal(round(result["speedup_vs_static"], 2), ">=", 1.5),
        "ttft_p99_vs_static": goal(round(continuous["ttft_p99_s"] / static["ttft_p99_s"], 2), "<=", 1.0),
        "prefix_ttft_speedup": goal(round(result["prefix_ttft_speedup"], 2), ">=", 2.0),
        "greedy_identical": goal(identical, "==", True),
    }
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
