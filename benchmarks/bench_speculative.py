"""Speculative decoding on CPU, batch 1: wall-clock speedup over plain greedy decoding, with a draft model and
with draft-free prompt lookup, at identical greedy output (asserted).

Needs a trained target and a smaller draft trained on the same tokenizer and shards. The figures in the
report come from these (about 15 minutes of 2 CPU cores in all):

    llmlab tokenizer train stdlib --vocab-size 4096 --out runs/spec-bench/tokenizer
    llmlab data prepare stdlib --tokenizer runs/spec-bench/tokenizer --out runs/spec-bench/shards
    llmlab pretrain --config configs/cpu-demo.toml data.shards=runs/spec-bench/shards \\
        train.out_dir=runs/spec-bench train.run_name=target
    llmlab pretrain --config configs/cpu-demo.toml data.shards=runs/spec-bench/shards \\
        train.out_dir=runs/spec-bench train.run_name=draft model.n_layer=1 model.d_model=128 model.n_head=2 \\
        optim.lr=3e-3
    python benchmarks/bench_speculative.py [--target runs/spec-bench/target] [--draft runs/spec-bench/draft]

--target/--draft take a checkpoint directory or a run directory (its newest ckpt-STEP is used). Each method
decodes the same prompts; methods alternate within each repeat so machine load hits them alike, and the
figure per method is the median over repeats of the total time over prompts. `speedup` = plain time /
speculative time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmlab.infer import generate
from llmlab.infer.lookup import PromptLookup
from llmlab.infer.speculative import speculative_generate
from llmlab.model import Transformer

DEFAULT_TARGET, DEFAULT_DRAFT = Path("runs/spec-bench/target"), Path("runs/spec-bench/draft")

# Prompts in the corpus's register (Python sources and docs); the continuation is the model's own.
PROMPTS = [
    "def ",
    "import os\n",
    "class Parser:\n",
    "The module ",
    'def read_config(path):\n    """Read a configuration file and return a dict."""\n',
    "    for i in range(len(items)):\n        if items[i] is None:\n",
]


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or a run directory's newest ckpt-STEP."""
    if (path / "config.json").is_file():
        return path
    ckpts = sorted(p for p in path.glob("ckpt-*") if (p / "config.json").is_file())
    if not ckpts:
        sys.exit(f"bench_speculative: no checkpoint at {path}; train a target and a draft first "
                 "(the commands are in this script's docstring) or pass --target/--draft")
    return ckpts[-1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args) -> dict:
    from llmlab.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    target_dir, draft_dir = checkpoint_dir(args.target), checkpoint_dir(args.draft)
    target, draft = Transformer.load(target_dir), Transformer.load(draft_dir)
    tok = Tokenizer.load(target_dir / "tokenizer")
    prompts = [[tok.eos_id] + tok.encode(p) for p in PROMPTS]
    n = args.max_new_tokens
    methods = {
        "plain": lambda ids: (generate(target, ids, n, temperature=0), None),
        "draft": lambda ids: speculative_generate(target, draft, ids, n, temperature=0,
                                                  speculate_k=args.k, return_stats=True),
        "lookup": lambda ids: speculative_generate(target, PromptLookup(), ids, n, temperature=0,
                                                   speculate_k=args.lookup_k, return_stats=True),
    }
    for ids in prompts:  # warm-up, and the identity check on every prompt
        ref = methods["plain"](ids)[0]
        for name in ("draft", "lookup"):
            out = methods[name](ids)[0]
            assert out.equal(ref), f"{name} output differs from plain greedy on prompt {tok.decode(ids)!r}"
    times = {name: [] for name in methods}
    stats = {name: [] for name in methods}
    for rep in range(args.repeats):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))
        for name in order:
            total = 0.0
            for ids in prompts:
                (out, st), dt = timed(lambda ids=ids, name=name: methods[name](ids))
                total += dt
                if rep == 0 and st is not None:
                    stats[name].append(st)
            times[name].append(total)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = len(prompts) * n
    result = {
        "benchmark": "speculative_decoding_cpu_greedy_batch1",
        "target": {"checkpoint": str(target_dir), "params": target.num_params(), **_shape(target)},
        "draft": {"checkpoint": str(draft_dir), "params": draft.num_params(), **_shape(draft)},
        "prompts": len(prompts), "max_new_tokens": n, "repeats": args.repeats, "threads": args.threads,
        "identical_greedy_output": True,
        "plain": {"seconds": round(med["plain"], 4), "tokens_per_s": round(tokens / med["plain"], 1)},
    }
    for name, k in (("draft", args.k), ("lookup", args.lookup_k)):
        result[name] = {"speculate_k": k, "seconds": round(med[name], 4),
                        "tokens_per_s": round(tokens / med[name], 1),
                        "speedup": round(med["plain"] / med[name], 3), **_pooled(stats[name])}
    return result


def _shape(model) -> dict:
    c = model.config
    return {"n_layer": c.n_layer, "d_model": c.d_model, "vocab_size": c.vocab_size, "position": c.position}


def _pooled(stats) -> dict:
    """Acceptance figures over all prompts (sums of the counters, then the ratios)."""
    acc, prop = sum(s.accepted for s in stats), sum(s.proposed for s in stats)
    rounds, gen = sum(s.row_rounds for s in stats), sum(s.generated for s in stats)
    fwd = sum(s.target_forwards for s in stats)
    return {"acceptance_rate": round(acc / prop, 4) if prop else None,
            "mean_accepted_length": round(acc / rounds, 3),
            "target_forwards_per_token": round(fwd / gen, 4),
            "draft_forwards_per_token": round(sum(s.draft_forwards for s in stats) / gen, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="target checkpoint or run directory")
    ap.add_argument("--draft", type=Path, default=DEFAULT_DRAFT, help="draft checkpoint or run directory")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft tokens proposed per round")
    ap.add_argument("--lookup-k", type=int, default=6, help="prompt-lookup tokens proposed per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (batch-1 decoding of "
                    "a few-M-parameter model gains little from more)")
    print(json.dumps(run(ap.parse_args()), indent=2))


if __name__ == "__main__":
    main()
