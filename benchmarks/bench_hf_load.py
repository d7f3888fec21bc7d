"""Loading a Hugging Face checkpoint: llmlab's load_hf vs transformers' AutoModelForCausalLM.from_pretrained.

The checkpoint is a randomly initialised GPT-2 small (124M parameters, fp32, model.safetensors ~0.5 GB) made
locally with transformers and saved to a temporary directory; nothing is downloaded. Each load runs in a
fresh subprocess, so its peak resident memory (ru_maxrss) is its own: `peak_mb` is the process's high-water
mark, `load_mb` the rise during the load alone (peak minus the mark after the imports), `used_mb` the rise
once one forward pass has run. transformers maps the safetensors file and its pages become resident only
when touched, so its load_mb is small and its used_mb is the honest figure; llmlab reads the weights into
memory during the load, so both of its figures are about the model's size. Linux carries ru_maxrss across
fork+exec, so this driver never imports torch and even the checkpoint is made in a child. The contenders
alternate, `--repeats` times each; the figures are the median time and the largest memory. Both loads are
checked to give the same logits on one batch (max_abs_diff). Prints one JSON object; ratios are llmlab /
transformers (lower is better). It ends with `targets`, and exits 1 when one is missed (0 with --no-check):
the same logits (max_abs_diff <= 1e-4); one copy of the weights during the load (llmlab load_mb <= 1.5 x
the file: two copies would show 2x); no more memory in use than transformers (used_mb ratio <= 1.0); and
load time within 1.25 x transformers'.

    python benchmarks/bench_hf_load.py [--repeats 3] [--layers 12] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from targets import add_no_check, finish, goal

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
which, path = sys.argv[1], sys.argv[2]
if which == "llmlab":
    from llmlab.model.hf import load_hf
    load = lambda: load_hf(path, tokenizer=False)[0]
    logits = lambda m, x: m(x)
else:
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path).eval()
    logits = lambda m, x: m(x).logits
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = logits(model, torch.arange(64).view(2, 32))[:, -1, :8].tolist()
used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kb": peak, "load_kb": peak - before, "used_kb": used - before,
                  "logits": out}))
"""


MAKE = r"""
import json, sys
from pathlib import Path
import torch
from transformers import GPT2Config, GPT2LMHeadModel
directory, n_layer = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer))  # GPT-2 small shape: d 768, 12 heads, vocab 50257
model.save_pretrained(directory)
size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "file_mb": round(size / 2**20, 1),
                  "format": "model.safetensors, fp32", "n_layer": n_layer}))
"""


def python(code: str, *argv) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12, help="12 = GPT-2 small (124M)")
    add_no_check(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = python(MAKE, tmp, args.layers)
        runs: dict[str, list[dict]] = {"llmlab": [], "transformers": []}
        for _ in range(args.repeats):
            for which in runs:
                runs[which].append(python(CHILD, which, tmp))
    result = {"benchmark": "hf_load", "checkpoint": ckpt, "repeats": args.repeats}
    for which, rs in runs.items():
        result[which] = {"load_s": round(statistics.median(r["seconds"] for r in rs), 3),
                         "peak_mb": round(max(r["peak_kb"] for r in rs) / 1024, 1),
                         "load_mb": round(max(r["load_kb"] for r in rs) / 1024, 1),
                         "used_mb": round(max(r["used_kb"] for r in rs) / 1024, 1)}
    a, b = result["llmlab"], result["transformers"]
    result["ratio"] = {k: round(a[k] / b[k], 3) for k in ("load_s", "load_mb", "used_mb", "peak_mb")}
    ours, theirs = runs["llmlab"][0]["logits"], runs["transformers"][0]["logits"]
    result["max_abs_diff"] = max(abs(x - y) for r1, r2 in zip(ours, theirs, strict=True)
                                 for x, y in zip(r1, r2, strict=True))
    targets = {"same_logits": goal(result["max_abs_diff"], "<=", 1e-4),
               "load_mb_per_file_mb": goal(round(a["load_mb"] / ckpt["file_mb"], 3), "<=", 1.5),
               "used_mb_ratio": goal(result["ratio"]["used_mb"], "<=", 1.0),
               "load_s_ratio": goal(result["ratio"]["load_s"], "<=", 1.25)}
    sys.exit(finish(result, targets, args.no_check))


if __name__ == "__main__":
    main()
