"""Decode throughput on CPU: llmlab.infer.generate vs transformers' GPT2LMHeadModel.generate, same model.

One GPT-2-shaped model (n_layer 4, d_model 256, 4 heads, vocab 8192, context 512), fp32, batch 1, a 32-token
prompt, 256 new tokens, greedy, KV cache on both sides (transformers: use_cache=True, its default dynamic
cache; llmlab: the static cache). transformers gets llmlab's weights, and the two token sequences are
checked to be identical, so both do exactly the same work. Runs alternate; the figure is each side's median
wall time for prefill + 256 steps (`ratio` = llmlab / transformers tokens/s, target >= 1.5), with the
fastest runs' ratio beside it because other processes on a shared machine only ever add time.

    python benchmarks/bench_decode.py [--new 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from llmlab.infer import generate
from llmlab.model import ModelConfig, Transformer

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
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    return hf


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "mini", **DIMS)).eval()
    with torch.no_grad():  # a sharper head than the 0.02 init keeps greedy picks away from near-ties
        model.lm_head.weight.mul_(10)
    hf = hf_copy(model)
    prompt = torch.randint(1, DIMS["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def ours():
        return generate(model, prompt, args.new, temperature=0)

    def theirs():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0)

    a, b = ours(), theirs()  # warm-up, and the same tokens from both
    same = torch.equal(a, b)
    times = {"llmlab": [], "transformers": []}
    for _ in range(args.repeats):
        times["llmlab"].append(timed(ours)[0])
        times["transformers"].append(timed(theirs)[0])
    import transformers

    result = {"benchmark": "decode_cpu_fp32_batch1_greedy", "dims": DIMS, "prompt_tokens": args.prompt,
              "new_tokens": args.new, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers_version": transformers.__version__,
              "identical_tokens": same}
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"tokens_per_s": round(args.new / t, 1), "ms_per_token": round(1000 * t / args.new, 3),
                        "best_tokens_per_s": round(args.new / min(ts), 1)}
    result["ratio"] = round(result["llmlab"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    # Other processes only ever add time, so the fastest run of each is the least disturbed comparison.
    result["ratio_best_runs"] = round(result["llmlab"]["best_tokens_per_s"] / result["transformers"]["best_tokens_per_s"], 3)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    result["target"] = 1.5
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
