"""CPU throughput: torch.compile vs eager for the cpu-demo model, and 2-process DDP scaling efficiency.

    python benchmarks/bench_ddp_compile.py [--steps 10] [--skip-compile] [--no-check]

Each measurement is forward + backward + AdamW on random tokens (the cpu-demo preset's GPT-2 4x256, block
256, batch 16), timed after warm-up steps; compile's one-off warm-up (graph capture + C++ codegen) is
reported separately because on CPU it can take longer than a short run. DDP: the same step on 1 process
and on 2 gloo processes (one thread each); efficiency = tokens/s(2 ranks) / (2 x tokens/s(1 rank)).
Prints JSON ending with `targets` (compiled steps at least as fast as eager; DDP efficiency >= 0.8, which
needs two otherwise idle cores) and exits 1 when one is missed (0 with --no-check).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmlab.model import ModelConfig, Transformer
from llmlab.train.distributed import ParallelConfig, parallelize
from targets import add_no_check, finish, goal, unmeasured

MODEL = dict(n_layer=4, n_head=4, d_model=256, block_size=256, vocab_size=4096, position="learned",
             norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True, dropout=0.0)
BATCH = 16


def tokens_per_s(model, steps: int, warmup: int, batch: int = BATCH) -> tuple[float, float]:
    """(tokens/s over `steps` timed steps, seconds spent in the `warmup` steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, MODEL["vocab_size"], (batch, MODEL["block_size"] + 1), generator=g)

    def step():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * MODEL["block_size"] / (time.perf_counter() - t1), t1 - t0


def _rank(rank: int, world: int, steps: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    model = parallelize(model, ParallelConfig(strategy="ddp"), torch.device("cpu"))
    tps, _ = tokens_per_s(model, steps, warmup=2, batch=BATCH // 2)
    if rank == 0:
        q.put(tps * world)  # every rank runs the same per-rank batch
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-compile", action="store_true")
    add_no_check(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"benchmark": "ddp_compile", "model": MODEL, "batch": BATCH, "threads_per_process": 1,
              "load_avg": round(os.getloadavg()[0], 2)}
    torch.manual_seed(0)
    eager, _ = tokens_per_s(Transformer(ModelConfig(**MODEL)), args.steps, warmup=2)
    result["eager_tokens_per_s"] = round(eager, 1)
    if not args.skip_compile:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**MODEL))
        compiled = parallelize(model, ParallelConfig(compile=True), torch.device("cpu"))
        tps, warm = tokens_per_s(compiled, args.steps, warmup=2)
        result.update(compiled_tokens_per_s=round(tps, 1), compile_warmup_s=round(warm, 1),
                      compile_speedup=round(tps / eager, 3))
    # DDP scaling: 1 rank with per-rank batch B/2 vs 2 ranks with B/2 each
    ctx = mp.get_context("spawn")
    rates = {}
    for world in (1, 2):
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, args.steps, 29500 + world, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        rates[world] = q.get(timeout=600)
        for p in procs:
            p.join()
    result.update(ddp_1rank_tokens_per_s=round(rates[1], 1), ddp_2rank_tokens_per_s=round(rates[2], 1),
                  ddp_scaling_efficiency=round(rates[2] / (2 * rates[1]), 3))
    if args.skip_compile:
        compile_target = unmeasured(">=", 1.0, "--skip-compile")
    else:
        compile_target = goal(result["compile_speedup"], ">=", 1.0)
    targets = {"compile_speedup": compile_target,
               "ddp_scaling_efficiency": goal(result["ddp_scaling_efficiency"], ">=", 0.8)}
    sys.exit(finish(result, targets, args.no_check))


if __name__ == "__main__":
    main()
