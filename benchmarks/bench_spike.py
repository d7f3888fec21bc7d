"""Spike guard benchmark: final val loss of clean vs poisoned-with-guard vs poisoned-without-guard runs.

    python benchmarks/bench_spike.py [--steps 200] [--no-check]

A tiny GPT-2 (2x32) learns synthetic LCG runs on one CPU thread; the poisoned runs get 12 consecutive
batches whose targets are all token 0 (CorruptBatches) late in the run; all three runs use the same seed.
Prints JSON with each val loss and the ratios to the clean run, plus the guard's events. Takes well under a
minute. It ends with `targets` and exits 1 when one is missed (0 with --no-check): the guarded run ends
within 2% of the clean val loss, and the poison costs the unguarded run at least 2% (else the benchmark
shows nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.data.loader import TokenLoader
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.model import ModelConfig, Transformer
from llmlab.train import OptimConfig, TrainConfig, Trainer
from llmlab.train.faults import CorruptBatches
from llmlab.train.metrics import read_metrics
from llmlab.train.pretrain import lm_loss, make_eval, seed_everything
from llmlab.train.spike import SpikeConfig, SpikeGuard
from targets import add_no_check, finish, goal

V = 64


def run(shards: Path, run_dir: Path, steps: int, guard: bool, poison: range | None) -> dict:
    seed_everything(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, block_size=32,
                                    position="learned", norm="layernorm", mlp="gelu", bias=True,
                                    tie_embeddings=True, dropout=0.0))
    loader = TokenLoader(shards, "train", 32, 8, seed=0)
    batches = CorruptBatches(loader, poison) if poison else loader
    cfg = SpikeConfig(window=30, warmup=20, min_samples=10, sustain=3, rollback_steps=10, skip_batches=4,
                      max_rollbacks=3)
    trainer = Trainer(model, lm_loss, batches, OptimConfig(lr=2e-3, warmup_steps=10, max_steps=steps),
                      TrainConfig(eval_every=0, eval_batches=8, ckpt_every=10, keep_last=2, device="cpu",
                                  progress=False, plot=False, peak_flops=1e11),
                      run_dir=run_dir, eval_fn=make_eval(TokenLoader(shards, "val", 32, 8, seed=0), 8),
                      callbacks=[SpikeGuard(cfg)] if guard else [])
    t0 = time.perf_counter()
    summary = trainer.fit()
    events = [e for r in read_metrics(run_dir / "metrics.jsonl") for e in r.get("events") or []
              if e["type"] in ("spike", "skip", "rollback")]
    return {"val_loss": summary["val_loss"], "seconds": round(time.perf_counter() - t0, 2),
            "events": {k: sum(e["type"] == k for e in events) for k in ("spike", "skip", "rollback")},
            "rollbacks": [{k: e[k] for k in ("from_step", "to_step", "skip")} for e in events
                          if e["type"] == "rollback"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    add_no_check(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    splits = {"train": [affine_stream(30000, V, 0)], "val": [affine_stream(3000, V, 2)]}
    write_shard_dir(tmp / "shards", splits, vocab_size=V,
                    extra={"tokenizer": {"vocab_size": V, "eos_id": None}})
    poison = range(args.steps - 15, args.steps - 3)
    clean = run(tmp / "shards", tmp / "clean", args.steps, True, None)
    guarded = run(tmp / "shards", tmp / "guarded", args.steps, True, poison)
    unguarded = run(tmp / "shards", tmp / "unguarded", args.steps, False, poison)
    result = {
        "benchmark": "spike_guard", "steps": args.steps, "poisoned_batches": [poison.start, poison.stop - 1],
        "clean": clean, "poisoned_with_guard": guarded, "poisoned_without_guard": unguarded,
        "ratio_guarded_to_clean": round(guarded["val_loss"] / clean["val_loss"], 4),
        "ratio_unguarded_to_clean": round(unguarded["val_loss"] / clean["val_loss"], 4),
    }
    targets = {"guarded_to_clean": goal(result["ratio_guarded_to_clean"], "<=", 1.02),
               "unguarded_to_clean": goal(result["ratio_unguarded_to_clean"], ">=", 1.02)}
    sys.exit(finish(result, targets, args.no_check))


if __name__ == "__main__":
    main()
