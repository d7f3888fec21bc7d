"""Quantization benchmark: held-out perplexity, file size and decode speed of int8 / int4 RTN / GPTQ / AWQ
against the full-precision checkpoint they come from (fp32 on CPU by default; bf16 on a GPU with
--device cuda --dtype bfloat16).

For each variant the checkpoint is quantized (GPTQ and AWQ calibrate on windows of the shards' *train* split),
saved, and loaded back with load_model, so every figure is for the file a user would ship:
  ppl          perplexity on the val split with exact arithmetic (in --dtype) on the quantized weights
               (kernel "dequant": the effect of quantization alone)
  ppl_packed   the same with the default kernel (torch's packed int8/int4 ops, bf16 activations on CPU)
  file_bytes   size of model.safetensors (embeddings and LM head stay in --dtype in every variant)
  decode_tok_s_Nt  greedy decoding, batch 1, KV cache, default kernel, N torch threads; runs alternate
               between the variants round by round so machine load hits all alike (median per variant).
               On a GPU the key is decode_tok_s_cuda (threads do not apply; timings synchronize the device)
Ratios are against the baseline (fp32, or bf16 with --dtype bfloat16) measured in the same run. On CPU every
model runs with measured linear routes (llmlab.infer.cpu_linear, as `llmlab generate` and `llmlab eval ppl`
apply them; --no-cpu-routes for plain F.linear). Targets (from the GPTQ / AWQ papers' pattern): int8 RTN
within +1% perplexity; GPTQ and AWQ each recover at least half of RTN-int4's perplexity increase, i.e.
recovery = (ppl_rtn - ppl_method) / (ppl_rtn - ppl_base) >= 0.5 at the same group size. The JSON ends with
`targets`; exit 1 when one is missed (0 with --no-check). The int4-awq-noclip rows are AWQ without its
clipping search (`--awq-no-clip`).

--device/--dtype: everything runs on that device (calibration included). Quantization always starts from
the checkpoint's fp32 weights (GPTQ/AWQ calibrate in fp32, as the trainer keeps fp32 master weights); the
quantized model, and the baseline, are then cast to --dtype, saved and loaded back, so the bf16 baseline's
file_bytes is that of a bf16 file.

    make demo   # the cpu-demo model: runs/demo/ckpt-STEP, its shards in runs/demo/shards
    python benchmarks/bench_quant.py --ckpt runs/demo/ckpt-STEP --data runs/demo/shards --groups 128 32
    python benchmarks/bench_quant.py ... --outliers 20 --only int4-rtn-g128 int4-gptq-g128 int4-awq-g128
    python benchmarks/bench_quant.py ... --device cuda --dtype bfloat16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.device import synchronize
from llmlab.infer.cpu_linear import route_cpu_linears
from targets import add_no_check, finish, goal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINES = {torch.float32: ("fp32", 32), torch.bfloat16: ("bf16", 16)}  # baseline variant name, bits


def variants(groups: list[int],
             dtype: torch.dtype = torch.float32) -> list[tuple[str, str, int, int | None, dict]]:
    """(name, method, bits, group size, quantize() options) of every row, the baseline first."""
    base, base_bits = BASELINES[dtype]
    out = [(base, "none", base_bits, None, {}), ("int8-rtn", "rtn", 8, None, {}),
           ("int8-gptq", "gptq", 8, None, {}), ("int8-awq", "awq", 8, None, {})]
    for g in groups:
        out += [(f"int4-rtn-g{g}", "rtn", 4, g, {}), (f"int4-gptq-g{g}", "gptq", 4, g, {}),
                (f"int4-awq-g{g}", "awq", 4, g, {}), (f"int4-awq-noclip-g{g}", "awq", 4, g, {"clip": False})]
    return out


def decode_seconds(model, prompt: list[int], new_tokens: int) -> float:
    from llmlab.infer import generate

    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    generate(model, prompt, new_tokens, temperature=0)
    synchronize(device)
    return time.perf_counter() - start


def packed_layers(model) -> str | None:
    """"k/n": how many quantized layers run a packed torch kernel (the rest dequantize on the fly)."""
    from llmlab.infer.quant import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    packed = sum(any(fn is not None for fn, _ in m._impl.values()) for m in layers)
    return f"{packed}/{len(layers)}"


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype asked for, or one line on stderr and exit 2."""
    from llmlab.device import resolve_device
    from llmlab.errors import LLMLabError

    try:
        dev = resolve_device(device)
    except LLMLabError as e:
        fail(str(e))
    return dev, DTYPES[dtype]


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def fail(message: str) -> None:
    print(f"bench_quant: error: {message}", file=sys.stderr)
    sys.exit(2)


@torch.no_grad()
def inject_outliers(model, factor: float, channels: int = 4, seed: int = 0) -> None:
    """Make `channels` input channels of every qkv and fc layer `factor` times larger and their weight
    columns `factor` times smaller: the same function, but with the activation outliers LLMs beyond a few
    billion parameters have (Dettmers et al. 2022) and this small model lacks. The premise AWQ is built on:
    the weights of those channels matter most and RTN's shared group scale rounds them coarsely."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for norm, linear in ((block.attn_norm, block.attn.qkv), (block.mlp_norm, block.mlp.fc)):
            idx = torch.randperm(linear.in_features, generator=gen)[:channels]
            norm.weight[idx] *= factor
            if getattr(norm, "bias", None) is not None:
                norm.bias[idx] *= factor
            linear.weight[:, idx] /= factor


def measure_variant(args, dev: torch.device, dtype: torch.dtype, work: Path, calib: torch.Tensor,
                    prompt: list[int], variant: tuple) -> tuple[dict, torch.nn.Module]:
    """Quantize (from fp32, on `dev`), save in `dtype`, load back; the variant's row and the loaded model."""
    from llmlab.evals.perplexity import evaluate_perplexity
    from llmlab.infer.quant import load_model, quantize, set_kernel
    from llmlab.model import Transformer
    from llmlab.model.transformer import WEIGHTS_FILE

    name, method, bits, group, options = variant
    model = Transformer.load(args.ckpt, device=dev, dtype=torch.float32)
    if args.outliers:
        inject_outliers(model, args.outliers)
    seconds = 0.0
    if method != "none":
        synchronize(dev)
        start = time.perf_counter()
        quantize(model, method, bits, group, None if method == "rtn" else calib, act_order=args.act_order,
                 progress=False, **options)
        synchronize(dev)
        seconds = time.perf_counter() - start
    as_stored = method == "none" and not args.outliers and dtype == torch.float32
    path = Path(args.ckpt) if as_stored else work / name
    if not as_stored:
        model.to(dtype)  # QuantLinear keeps its scales in fp32
        model.save(path)
    model = load_model(path, device=dev, dtype=dtype)  # every figure is for the file as loaded
    if dev.type == "cpu" and not args.no_cpu_routes:
        route_cpu_linears(model)
    row = {"variant": name, "method": method, "bits": bits, "group_size": group,
           "quantize_s": round(seconds, 1), "file_bytes": (path / WEIGHTS_FILE).stat().st_size}
    set_kernel(model, "dequant")
    row["ppl"] = evaluate_perplexity(model, args.data, batch_size=args.batch_size)["ppl"]
    set_kernel(model, "auto")
    row["ppl_packed"] = evaluate_perplexity(model, args.data, batch_size=args.batch_size)["ppl"]
    row["packed_layers"] = packed_layers(model)
    decode_seconds(model, prompt, 8)  # warm-up (and kernel choice) before timing
    return row, model


def time_decoding(args, dev: torch.device, rows: list[dict], models: dict, prompt: list[int]) -> None:
    """decode_tok_s_<label> and decode_speedup_<label> (vs the baseline, rows[0]) into every row; label is
    the thread count ("1t") on CPU and the device type ("cuda") elsewhere."""
    labels = [(f"{t}t", t) for t in args.threads] if dev.type == "cpu" else [(dev.type, max(args.threads))]
    base = rows[0]
    for label, threads in labels:
        torch.set_num_threads(threads)
        times = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(decode_seconds(model, prompt, args.new_tokens))
        for row in rows:
            tok_s = args.new_tokens / statistics.median(times[row["variant"]])
            row[f"decode_tok_s_{label}"] = round(tok_s, 1)
            row[f"decode_speedup_{label}"] = round(tok_s / base[f"decode_tok_s_{label}"], 3)


def recovery_targets(rows: list[dict], groups: list[int]) -> dict:
    """int8 RTN's perplexity change (%) <= 1, and each int4 method's recovery of RTN's increase >= 0.5."""
    base = rows[0]
    by = {r["variant"]: r for r in rows}
    targets = {}
    if "int8-rtn" in by:
        targets["int8_rtn_ppl_delta_pct"] = goal(by["int8-rtn"]["ppl_delta_pct"], "<=", 1.0)
    for g in groups:
        rtn = by.get(f"int4-rtn-g{g}")
        for method in ("gptq", "awq", "awq-noclip"):
            other = by.get(f"int4-{method}-g{g}")
            if rtn and other and rtn["ppl"] > base["ppl"]:
                rec = (rtn["ppl"] - other["ppl"]) / (rtn["ppl"] - base["ppl"])
                targets[f"{method.replace('-', '_')}_g{g}_recovery"] = goal(round(rec, 3), ">=", 0.5)
    return targets


def run(args, dev: torch.device, dtype: torch.dtype) -> dict:
    from llmlab.evals.perplexity import evaluate_perplexity
    from llmlab.infer.quant.calib import calibration_tokens

    torch.set_num_threads(max(args.threads))
    torch.manual_seed(0)
    calib = calibration_tokens(args.data, args.calib_samples, args.calib_len, seed=0)
    val_prompt = calibration_tokens(args.data, 1, args.prompt_tokens, seed=1)[0].tolist()
    base_name = BASELINES[dtype][0]
    rows, models = [], {}
    todo = [v for v in variants(args.groups, dtype)
            if args.only is None or v[0] in args.only or v[0] == base_name]
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as work:
        for variant in todo:
            row, model = measure_variant(args, dev, dtype, Path(work), calib, val_prompt, variant)
            models[variant[0]] = model
            rows.append(row)
            print(json.dumps(row), flush=True)
    time_decoding(args, dev, rows, models, val_prompt)
    base = rows[0]
    for row in rows:
        row["ppl_delta_pct"] = round(100 * (row["ppl"] / base["ppl"] - 1), 3)
        row[f"size_ratio_vs_{base_name}"] = round(row["file_bytes"] / base["file_bytes"], 3)
        row["ppl"], row["ppl_packed"] = round(row["ppl"], 4), round(row["ppl_packed"], 4)
    targets = recovery_targets(rows, args.groups)
    model = models[base_name]
    return {"benchmark": f"quantization_{dev.type}", "checkpoint": args.ckpt, "data": args.data,
            "device": str(dev), "dtype": args.dtype, "gpu": device_name(dev),
            "model": {k: getattr(model.config, k) for k in ("n_layer", "d_model", "n_head", "ffn_dim",
                                                            "vocab_size", "block_size", "mlp", "position",
                                                            "tie_embeddings")},
            "params": model.num_params(), "val_tokens": evaluate_perplexity(model, args.data)["tokens"],
            "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len, "split": "train",
                            "dtype": "float32"},
            "act_order": args.act_order, "outliers": args.outliers,
            "cpu_routes": dev.type == "cpu" and not args.no_cpu_routes,
            "decode_threads": args.threads if dev.type == "cpu" else None, "torch": torch.__version__,
            "decode": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": 1,
                       "rounds": args.rounds},
            "rows": rows, "targets": targets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="fp32 checkpoint directory")
    ap.add_argument("--data", required=True,
                    help="prepared shard directory (val: perplexity, train: calibration)")
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 32], help="int4 group sizes")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    ap.add_argument("--batch-size", type=int, default=8, help="perplexity windows per forward")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timed decode rounds per variant")
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch thread counts to time decoding at on CPU (1: steadier on a shared box)")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda | cuda:N | mps | auto (cuda, then mps, then cpu)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="compute and storage dtype of the baseline and the quantized models' "
                         "unquantized tensors")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    ap.add_argument("--outliers", type=float, default=0.0,
                    help="stress test: give the model outlier activation channels of this factor (see "
                         "inject_outliers; the fp32 function is unchanged); 0 = off")
    ap.add_argument("--json-out", default=None, help="also write the JSON here")
    ap.add_argument("--no-cpu-routes", action="store_true",
                    help="on CPU, run plain F.linear instead of measured linear routes")
    add_no_check(ap)
    args = ap.parse_args()
    from llmlab.errors import LLMLabError

    dev, dtype = resolve_device_dtype(args.device, args.dtype)
    try:
        result = run(args, dev, dtype)
    except LLMLabError as e:
        fail(str(e))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return finish(result, result["targets"], args.no_check)


if __name__ == "__main__":
    sys.exit(main())
