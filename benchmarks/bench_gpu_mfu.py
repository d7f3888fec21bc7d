"""GPU training MFU of a gpt2-124M-class model in bf16, eager and with torch.compile (one prepared run).

    python benchmarks/bench_gpu_mfu.py [--batch 32] [--steps 20] [--flavour gpt2] [--no-check]

Each step is what `llmlab pretrain` does per micro-batch: bf16 autocast forward, the pretraining loss,
backward, gradient clipping and fused AdamW, on random tokens (throughput does not depend on the data).
MFU = flops_per_token (6N + attention, see Transformer.flops_per_token) x tokens/s / the datasheet bf16
peak from llmlab.train.metrics (989 TFLOP/s for H100/H200 SXM). Prints JSON ending with `targets`
(compiled MFU >= 40%) and exits 1 when it is missed (0 with --no-check). Without a CUDA device it prints
{"skipped": ...} with the target unmeasured (met null) and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.train.distributed import ParallelConfig, parallelize
from llmlab.train.metrics import peak_flops
from llmlab.train.optim import OptimConfig, build_optimizer
from llmlab.train.pretrain import lm_loss
from targets import add_no_check, finish, goal, unmeasured

MFU_GOAL = 0.40


def measure(compile_model: bool, args) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.flavour, "gpt2-124M", vocab_size=50304)
    model = Transformer(cfg).to(device)
    run = parallelize(model, ParallelConfig(strategy="none", compile=compile_model), device)
    opt = build_optimizer(model, OptimConfig(lr=6e-4))
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = lm_loss(run, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = args.steps * args.batch * cfg.block_size / seconds
    fpt = model.flops_per_token(cfg.block_size)
    peak = peak_flops(device, torch.bfloat16)
    return {"compile": compile_model, "tokens_per_s": round(tokens_per_s),
            "mfu": round(fpt * tokens_per_s / peak, 4), "warmup_s": round(warmup_s, 1),
            "flops_per_token": fpt, "peak_flops": peak, "params": model.num_params(),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
    add_no_check(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        why = "no CUDA device; run this on a GPU machine"
        sys.exit(finish({"benchmark": "gpu_mfu", "skipped": why},
                        {"mfu_compiled": unmeasured(">=", MFU_GOAL, why)}))
    eager, compiled = measure(False, args), measure(True, args)
    result = {"benchmark": "gpu_mfu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "batch": args.batch, "flavour": args.flavour, "eager": eager, "compiled": compiled}
    sys.exit(finish(result, {"mfu_compiled": goal(compiled["mfu"], ">=", MFU_GOAL)}, args.no_check))


if __name__ == "__main__":
    main()
