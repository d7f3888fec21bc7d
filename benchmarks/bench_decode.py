"""Decode throughput on CPU: llmlab.infer.generate with plain F.linear, with measured CPU routes, and
transformers' GPT2LMHeadModel.generate, same model.

One GPT-2-shaped model (n_layer 4, d_model 256, 4 heads, vocab 8192, context 512), fp32, batch 1, a 32-token
prompt, 256 new tokens, greedy, KV cache on all sides (transformers: use_cache=True, its default dynamic
cache; llmlab: the static cache). llmlab runs twice: `plain` (nn.Linear, F.linear) and `routed` (the same
weights after llmlab.infer.cpu_linear.route_cpu_linears, which `llmlab generate --cpu-routes` applies on
CPU: each product shape takes the route measured fastest on this machine, during the warm-up run).
transformers gets llmlab's weights, and the three token sequences are checked to be identical, so all do the
same work. Runs alternate; each side's figure is its median wall time for prefill + 256 steps, with the
fastest runs beside it because other processes on a shared machine only ever add time. `routed_vs_plain`
(routed / plain speed) comes from --pairs back-to-back pairs of short runs (--pair-new tokens), the median
of the pairs' ratios, since short adjacent runs share the machine's load. `routes` lists the route measured
per shape.

Targets: routed llmlab >= 1.5x transformers tokens/s; routed >= 0.97x plain (routing is never slower than
F.linear beyond noise); identical tokens. Exit 1 when one is missed (0 with --no-check).

    python benchmarks/bench_decode.py [--new 256] [--repeats 7] [--no-check]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from llmlab.infer import generate
from llmlab.infer.cpu_linear import route_cpu_linears, route_table
from llmlab.model import ModelConfig, Transformer
from targets import add_no_check, finish, goal

DIMS = dict(n_layer=4, d_model=256, n_head=4, vocab_size=8192, block_size=512)


def hf_copy(model: Transformer):
    """GPT2LMHeadModel with the llmlab model's weights (Conv1D layers store the transposed matrices)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=DIMS["vocab_size"], n_positions=DIMS["block_size"], n_embd=DIMS["d_model"],
                     n_layer=DIMS["n_layer"], n_head=DIMS["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, layer_norm_epsilon=model.config.norm_eps)
    hf = GPT2LMHeadModel(cfg).eval()
    src = model.state_dict()
    dst = {"transformer.wte.weight": src["tok_emb.weight"], "transformer.wpe.weight": src["pos_emb.weight"],
           "transformer.ln_f.weight": src["norm.weight"], "transformer.ln_f.bias": src["norm.bias"],
           "lm_head.weight": src["tok_emb.weight"]}
    names = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(DIMS["n_layer"]):
        for ours, theirs in names.items():
            w, b = src[f"blocks.{i}.{ours}.weight"], src[f"blocks.{i}.{ours}.bias"]
            dst[f"transformer.h.{i}.{theirs}.weight"] = w if "norm" in ours else w.t().contiguous()
            dst[f"transformer.h.{i}.{theirs}.bias"] = b
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    only_buffers_missing = all("attn.bias" in k or "masked_bias" in k for k in missing)
    assert not unexpected and only_buffers_missing, (missing, unexpected)
    return hf


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def paired_ratio(a, b, pairs: int) -> float:
    """Median over `pairs` back-to-back runs of time(a) / time(b), the order flipping every pair: short
    adjacent runs share the machine's load far better than long runs apart."""
    ratios = []
    for i in range(pairs):
        if i % 2 == 0:
            ta, tb = timed(a)[0], timed(b)[0]
        else:
            tb, ta = timed(b)[0], timed(a)[0]
        ratios.append(ta / tb)
    return statistics.median(ratios)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pairs", type=int, default=30,
                    help="short plain / routed run pairs for routed_vs_plain")
    ap.add_argument("--pair-new", type=int, default=64, help="new tokens per run of those pairs")
    add_no_check(ap)
    args = ap.parse_args()

    torch.manual_seed(0)
    plain = Transformer(ModelConfig.preset("gpt2", "mini", **DIMS)).eval()
    with torch.no_grad():  # a sharper head than the 0.02 init keeps greedy picks away from near-ties
        plain.lm_head.weight.mul_(10)
    hf = hf_copy(plain)
    routed = route_cpu_linears(copy.deepcopy(plain))
    seeded = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, DIMS["vocab_size"], (1, args.prompt), generator=seeded)

    def theirs():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0)

    sides = {"llmlab_plain": lambda: generate(plain, prompt, args.new, temperature=0),
             "llmlab_routed": lambda: generate(routed, prompt, args.new, temperature=0),
             "transformers": theirs}
    outputs = [run() for run in sides.values()]  # warm-up (the routed side measures its routes here)
    same = all(torch.equal(outputs[0], out) for out in outputs[1:])
    times = {name: [] for name in sides}
    for rep in range(args.repeats):  # plain and routed swap places every repeat, right after transformers
        order = ["transformers", "llmlab_plain", "llmlab_routed"] if rep % 2 == 0 else \
            ["transformers", "llmlab_routed", "llmlab_plain"]
        for name in order:
            times[name].append(timed(sides[name])[0])
    import transformers

    result = {"benchmark": "decode_cpu_fp32_batch1_greedy", "dims": DIMS, "prompt_tokens": args.prompt,
              "new_tokens": args.new, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers_version": transformers.__version__,
              "identical_tokens": same}
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"tokens_per_s": round(args.new / t, 1), "ms_per_token": round(1000 * t / args.new, 3),
                        "best_tokens_per_s": round(args.new / min(ts), 1)}
    # Other processes only ever add time, so the fastest runs are the least disturbed comparison.
    for label, key in (("", "tokens_per_s"), ("_best_runs", "best_tokens_per_s")):
        speed = {name: result[name][key] for name in sides}
        result["ratio" + label] = round(speed["llmlab_routed"] / speed["transformers"], 3)
        result["ratio_plain" + label] = round(speed["llmlab_plain"] / speed["transformers"], 3)
    result["routed_vs_plain"] = round(paired_ratio(
        lambda: generate(plain, prompt, args.pair_new, temperature=0),
        lambda: generate(routed, prompt, args.pair_new, temperature=0), args.pairs), 3)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    result["routes"] = route_table(routed).summary()
    targets = {"ratio_vs_transformers": goal(result["ratio"], ">=", 1.5),
               "routed_vs_plain": goal(result["routed_vs_plain"], ">=", 0.97),
               "identical_tokens": goal(same, "==", True)}
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
