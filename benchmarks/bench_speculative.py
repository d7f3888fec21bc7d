r"""Speculative decoding on CPU, batch 1: wall-clock speedup over plain greedy decoding, with a draft model,
with draft-free prompt lookup, and with lookup-then-draft, at identical greedy output (asserted for every
prompt and setting).

Needs a trained target and a smaller draft on the same tokenizer; docs/performance.md's figures come from a
Llama-style 6 x 512 target (21M parameters) and GPT-2-style 1 x 128 drafts: `draft` trained on the corpus
and `draft-target-text` trained on the target's own greedy continuations of corpus prompts (`llmlab data
generate`). They are made by:

    D=runs/spec-bench
    llmlab tokenizer train stdlib --vocab-size 4096 --out $D/tokenizer
    llmlab data prepare stdlib --tokenizer $D/tokenizer --out $D/shards
    llmlab pretrain --config configs/cpu-demo.toml data.shards=$D/shards train.out_dir=$D \
        train.run_name=target model.position=rope model.norm=rmsnorm model.mlp=swiglu model.bias=false \
        model.n_layer=6 model.d_model=512 model.n_head=8 model.d_ff=1408 optim.lr=1.5e-3 \
        optim.warmup_steps=50 optim.max_steps=700 train.max_minutes=70
    llmlab pretrain --config configs/cpu-demo.toml data.shards=$D/shards train.out_dir=$D \
        train.run_name=draft model.n_layer=1 model.d_model=128 model.n_head=2 optim.lr=3e-3 \
        optim.max_steps=600
    llmlab data generate $D/target/ckpt-000700 --shards $D/shards --out $D/target-text --sequences 4096 \
        --batch-size 128
    llmlab pretrain --config configs/cpu-demo.toml data.shards=$D/target-text train.out_dir=$D \
        train.run_name=draft-target-text model.n_layer=1 model.d_model=128 model.n_head=2 optim.lr=3e-3 \
        optim.max_steps=1200 train.max_minutes=20
    python benchmarks/bench_speculative.py --threads 2 --k 1,2,3,4,5,6 --lookup-k 4,6,10 \
        --lookup-draft-k 4,6,10 --draft $D/draft-target-text

--target/--draft take a checkpoint directory or a run directory (its newest ckpt-STEP is used). Each setting
decodes the same prompts (128 new tokens each); settings alternate within each repeat so machine load hits
them alike, and the figure per setting is the median over repeats of the total time over prompts.
`speedup` = plain time / speculative time.

On CPU, target and draft run with measured linear routes (llmlab.infer.cpu_linear, as `llmlab generate`
applies them; --no-cpu-routes for plain F.linear), and `forward_cost_in_steps` gives the cost of a cached
target forward over T tokens (what a round's verification costs) in one-token steps, routed and with plain
F.linear: a draft's rounds pay where the draft keeps agreeing and verification over K+1 tokens stays cheap.

Targets: the best setting's speedup >= 1.5; on CPU, routed target forwards not slower than plain F.linear
ones (median over widths of F.linear time / routed time >= 0.97). Prints one JSON object ending with
`targets`; exit 1 when one is missed (0 with --no-check).

--device/--dtype (default cpu, float32) load target and draft there, e.g. `--device cuda --dtype bfloat16`;
timings then synchronize the device.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmlab.device import synchronize
from llmlab.infer import generate
from llmlab.infer.cpu_linear import route_cpu_linears, unroute
from llmlab.infer.lookup import PromptLookup
from llmlab.infer.speculative import speculative_generate
from llmlab.model import Transformer
from llmlab.model.kv_cache import KVCache
from targets import add_no_check, finish, goal, unmeasured

DEFAULT_TARGET, DEFAULT_DRAFT = Path("runs/spec-bench/target"), Path("runs/spec-bench/draft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

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


def resolve_device(name: str) -> torch.device:
    """The torch device asked for, or one line on stderr and exit 2."""
    from llmlab.device import resolve_device as resolve
    from llmlab.errors import LLMLabError

    try:
        device = resolve(name)
    except LLMLabError as e:
        _fail(str(e))
    return device


def _fail(message: str) -> None:
    print(f"bench_speculative: error: {message}", file=sys.stderr)
    sys.exit(2)


def verification_costs(versions: dict, prompt: list[int], widths=(1, 2, 4, 6, 8), repeats: int = 30) -> dict:
    """For each version of the target ({label: model}): the median time of a cached forward over T tokens
    after `prompt`, in one-token steps, and T1_ms; versions and widths alternate within each repeat. Plus
    `f_linear_over_routed`: the median over widths of the "f_linear" version's time / the "routed" one's."""
    model = next(iter(versions.values()))
    prompt = prompt[:model.config.block_size - max(widths)]  # context plus the widest forward must fit
    caches = {label: KVCache.for_model(m, 1, len(prompt) + max(widths)) for label, m in versions.items()}
    runs = {label: {T: [] for T in widths} for label in versions}
    with torch.inference_mode():
        for label, m in versions.items():
            m(torch.tensor([prompt]), cache=caches[label])
        for rep in range(repeats + 1):  # the first pass is a warm-up (and measures the routes)
            for T in widths:
                x = torch.tensor([prompt[-T:]])
                for label, m in versions.items():
                    caches[label].set_pos(len(prompt))
                    start = time.perf_counter()
                    m(x, cache=caches[label])
                    if rep:
                        runs[label][T].append(time.perf_counter() - start)
    seconds = {label: {T: statistics.median(r) for T, r in by_width.items()}
               for label, by_width in runs.items()}
    costs = {}
    for label, by_width in seconds.items():
        costs[label] = {f"T{T}": round(s / by_width[1], 3) for T, s in by_width.items()}
        costs[label]["T1_ms"] = round(1000 * by_width[1], 3)
    if {"routed", "f_linear"} <= set(seconds):
        ratios = [seconds["f_linear"][T] / seconds["routed"][T] for T in widths]
        costs["f_linear_over_routed"] = round(statistics.median(ratios), 3)
    return costs


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def run(args) -> tuple[dict, dict]:
    """(the result, its targets)."""
    from llmlab.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    target_dir, draft_dir = checkpoint_dir(args.target), checkpoint_dir(args.draft)
    target = Transformer.load(target_dir, device=device, dtype=dtype)
    draft = Transformer.load(draft_dir, device=device, dtype=dtype)
    routed = device.type == "cpu" and not args.no_cpu_routes
    if routed:  # as `llmlab generate` runs them on CPU
        route_cpu_linears(target)
        route_cpu_linears(draft)
    tok = Tokenizer.load(target_dir / "tokenizer")
    prompts = [[tok.eos_id] + tok.encode(p) for p in PROMPTS]
    n = args.max_new_tokens
    methods = {"plain": lambda ids: (generate(target, ids, n, temperature=0), None)}
    settings = [("draft", draft, k, None) for k in args.k]
    settings += [("draft", draft, k, c) for k in args.confidence_k for c in args.confidence]
    settings += [("lookup", PromptLookup(), k, None) for k in args.lookup_k]
    settings += [("lookup_draft", PromptLookup(fallback=draft), k, None) for k in args.lookup_draft_k]
    for kind, proposer, k, conf in settings:
        name = f"{kind}_k{k}" + (f"_c{conf:g}" if conf is not None else "")
        methods[name] = lambda ids, proposer=proposer, k=k, conf=conf: speculative_generate(
            target, proposer, ids, n, temperature=0, speculate_k=k, draft_confidence=conf, return_stats=True)
    for ids in prompts:  # warm-up, and the identity check on every prompt
        ref = methods["plain"](ids)[0]
        for name, method in methods.items():
            out = method(ids)[0]
            assert out.equal(ref), f"{name} output differs from plain greedy on prompt {tok.decode(ids)!r}"
    times = {name: [] for name in methods}
    stats = {name: [] for name in methods}
    for rep in range(args.repeats):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))
        for name in order:
            total = 0.0
            for ids in prompts:
                (out, st), dt = timed(lambda ids=ids, name=name: methods[name](ids), device)
                total += dt
                if rep == 0 and st is not None:
                    stats[name].append(st)
            times[name].append(total)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = len(prompts) * n
    result = {
        "benchmark": f"speculative_decoding_{device.type}_greedy_batch1",
        "device": str(device), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "target": _describe(target, target_dir),
        "draft": _describe(draft, draft_dir),
        "prompts": len(prompts), "max_new_tokens": n, "repeats": args.repeats, "threads": args.threads,
        "cpu_routes": routed, "identical_greedy_output": True,  # asserted above for every method and prompt
        "plain": {"seconds": round(med["plain"], 4), "tokens_per_s": round(tokens / med["plain"], 1)},
    }
    for name in methods:
        if name != "plain":
            result[name] = {"seconds": round(med[name], 4), "tokens_per_s": round(tokens / med[name], 1),
                            "speedup": round(med["plain"] / med[name], 3), **_pooled(stats[name])}
    speedups = [r["speedup"] for r in result.values() if isinstance(r, dict) and "speedup" in r]
    best = max(speedups, default=None)
    targets = {"best_speedup": goal(best, ">=", 1.5) if best is not None
               else unmeasured(">=", 1.5, "no speculative setting was run")}
    if device.type == "cpu":  # the cost of a verification forward over T tokens, routed and plain
        versions = {"routed": target if routed else route_cpu_linears(copy.deepcopy(target)),
                    "f_linear": unroute(copy.deepcopy(target)) if routed else target}
        costs = result["forward_cost_in_steps"] = verification_costs(versions, (prompts[-1] * 16)[:128])
        targets["routed_forward_vs_f_linear"] = goal(costs["f_linear_over_routed"], ">=", 0.97)
    else:
        targets["routed_forward_vs_f_linear"] = unmeasured(">=", 0.97, f"CPU routes do not apply on {device}")
    return result, targets


def _describe(model, ckpt: Path) -> dict:
    """Shape, size and (from the run's summary.json, when there) training tokens and validation loss."""
    info = {"checkpoint": str(ckpt), "params": model.num_params(), **_shape(model)}
    summary = ckpt.parent / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        info.update({k: s[k] for k in ("step", "tokens", "val_loss") if k in s})
    return info


def _shape(model) -> dict:
    c = model.config
    return {k: getattr(c, k) for k in ("n_layer", "n_head", "d_model", "ffn_dim", "vocab_size", "block_size",
                                       "position", "norm", "mlp")}


def _pooled(stats) -> dict:
    """Acceptance figures over all prompts (sums of the counters, then the ratios)."""
    acc, prop = sum(s.accepted for s in stats), sum(s.proposed for s in stats)
    rounds, gen = sum(s.row_rounds for s in stats), sum(s.generated for s in stats)
    fwd = sum(s.target_forwards for s in stats)
    lookup_rounds, all_rounds = sum(s.lookup_rounds for s in stats), sum(s.rounds for s in stats)
    return {"acceptance_rate": round(acc / prop, 4) if prop else None,
            "mean_accepted_length": round(acc / rounds, 3),
            "target_forwards_per_token": round(fwd / gen, 4),
            "draft_forwards_per_token": round(sum(s.draft_forwards for s in stats) / gen, 4),
            "lookup_round_share": round(lookup_rounds / all_rounds, 3)}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_TARGET,
                    help="target checkpoint or run directory")
    ap.add_argument("--draft", type=Path, default=DEFAULT_DRAFT, help="draft checkpoint or run directory")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=_ints, default=[1, 2, 3, 4],
                    help="draft tokens proposed per round (list)")
    ap.add_argument("--lookup-k", type=_ints, default=[4, 6, 10],
                    help="prompt-lookup tokens proposed per round on a match (list)")
    ap.add_argument("--lookup-draft-k", type=_ints, default=[4, 6],
                    help="speculate_k for lookup-then-draft (prompt lookup where the context has a match, "
                         "the draft elsewhere; list, empty string for none)")
    ap.add_argument("--confidence", type=_floats, default=[],
                    help="also run the draft with these draft_confidence values (list; guesses stop where "
                         "the draft's top probability is lower), at each of --confidence-k")
    ap.add_argument("--confidence-k", type=_ints, default=[4, 6],
                    help="speculate_k for the --confidence runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (batch-1 decoding of "
                    "a few-M-parameter model gains little from more)")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda | cuda:N | mps | auto (cuda, then mps, then cpu)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of target and draft")
    ap.add_argument("--no-cpu-routes", action="store_true",
                    help="on CPU, decode with plain F.linear instead of measured linear routes")
    add_no_check(ap)
    args = ap.parse_args()
    result, targets = run(args)
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
