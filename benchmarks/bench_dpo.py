"""DPO optimizer-step throughput on CPU: llmlab's Trainer + DPO objective vs TRL's DPOTrainer, same work.

One small GPT-2-shape model (n_layer 4, d_model 256, 4 heads, a BPE vocabulary of up to 1024 tokens
trained here, no dropout) is made by llmlab and exported with llmlab.model.hf.save_hf; so is the reference
model (the same weights plus a little noise, so the first step's loss is not just log 2). TRL trains the
exported policy with the exported reference, llmlab trains its own copy of the same weights. Both: the
same preference pairs (prompts and completions of ragged lengths), taken in the same order (TRL's
sequential sampler, llmlab's PairBatches with shuffle off), the token ids TRL produced, the sigmoid loss
with the same beta, reference log-probs precomputed once before training, torch AdamW at a constant LR
with the same betas, weight decay and clipping, fp32 and no activation checkpointing (TRL's DPOConfig turns
bf16 autocast and gradient checkpointing on by default; both are switched off here), one process.

Measured: every optimizer step (data, forward, backward, clipping, update; from one step's end to the
next) after the warm-up steps, in process CPU time (other jobs on a shared machine inflate wall time, not
our CPU time) and wall time, on --threads torch threads (default 1). tokens/s counts the real (non-pad)
tokens of the chosen and rejected sequences, the same for both. Each side runs --rounds times, alternating;
the fastest run of each is kept. `ratio` is llmlab's tokens per CPU-second over TRL's (target >= 1.5);
`first_step_loss_gap` compares the two losses of step 1 (target <= 1e-4). The llmlab run packs each
micro-batch's sequences into rows (data.packing) where TRL pads every sequence to the longest; the padded
llmlab run (`llmlab_padded`) is reported beside it. Prints one JSON object ending with `targets` (TRL's
own log lines go to stderr); exits 1 when a target is missed (0 with --no-check).

    python benchmarks/bench_dpo.py [--pairs-per-step 8] [--steps 10] [--rounds 1] [--threads 1] [--no-check]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.model import ModelConfig, Transformer
from made_up_text import text
from targets import add_no_check, finish, goal

DIMS = dict(n_layer=4, d_model=256, n_head=4, block_size=512)
VOCAB = 1024
BETA = 0.1
LR = 1e-5
def make_models(root: Path):
    """The tokenizer, the llmlab policy and reference, and their HF exports under root."""
    from llmlab.model.hf import save_hf
    from llmlab.tokenizer import Tokenizer

    rng = random.Random(0)
    tok = Tokenizer.train([text(rng, 20000)], vocab_size=VOCAB, progress=False, workers=1)
    torch.manual_seed(0)
    policy = Transformer(ModelConfig.preset("gpt2", "mini", vocab_size=tok.vocab_size, dropout=0.0, **DIMS))
    reference = Transformer(policy.config)
    with torch.no_grad():
        for p, q in zip(reference.parameters(), policy.parameters(), strict=True):
            p.copy_(q + 0.01 * torch.randn_like(q))
    save_hf(policy, root / "policy", tok)
    save_hf(reference, root / "reference", tok)
    return tok, policy, reference


def make_pairs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": text(rng, rng.randint(8, 48)) + " ?", "chosen": " " + text(rng, rng.randint(2, 32)),
             "rejected": " " + text(rng, rng.randint(2, 32))} for _ in range(n)]


class StepTimes:
    """Wall and process-CPU seconds between consecutive optimizer-step ends (the first from `start()`)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last = (0.0, 0.0)

    def start(self) -> None:
        self._last = (time.perf_counter(), time.process_time())

    def tick(self) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self._last[0])
        self.cpu.append(now[1] - self._last[1])
        self._last = now


def run_trl(root: Path, pairs: list[dict], args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepTimes()

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

    config = DPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=args.pairs_per_step,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, gradient_checkpointing=False,  # TRL's defaults are on; fp32 and no recompute, as llmlab
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"),
                         ref_model=AutoModelForCausalLM.from_pretrained(root / "reference"), args=config,
                         train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(root / "policy"), callbacks=[Timer()])
    data = trainer.train_dataset
    encoded = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in data]
    trl_ref = torch.tensor([[row["ref_chosen_logps"], row["ref_rejected_logps"]] for row in data])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"clock": clock, "first_loss": losses[0], "encoded": encoded, "ref": trl_ref}


def run_llmlab(policy: Transformer, reference: Transformer, encoded, args, packed: bool) -> dict:
    from llmlab.align.dpo import dpo_objective, frozen_reference, reference_logps
    from llmlab.align.pairs import EncodedPair, PairBatches
    from llmlab.train.optim import OptimConfig
    from llmlab.train.trainer import Callback, TrainConfig, Trainer

    pairs = [EncodedPair(tuple(p), tuple(c), tuple(r)) for p, c, r in encoded]
    clock = StepTimes()

    class Timer(Callback):
        def on_fit_start(self, trainer):
            clock.start()

        def on_step_end(self, trainer, record):
            clock.tick()

    model = Transformer(policy.config)
    model.load_state_dict(policy.state_dict())
    batches = PairBatches(pairs, args.pairs_per_step, shuffle=False, packed=packed)
    batches.extras = reference_logps(frozen_reference(reference), batches)
    optim = OptimConfig(lr=LR, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, warmup_steps=0,
                        max_steps=args.warmup + args.steps, min_lr_ratio=1.0)
    train = TrainConfig(eval_every=0, ckpt_every=0, progress=False, plot=False, device="cpu")
    trainer = Trainer(model, dpo_objective(beta=BETA), batches, optim, train, callbacks=[Timer()])
    records = []
    trainer.callbacks.append(type("Keep", (Callback,), {"on_step_end": lambda s, t, r: records.append(r)})())
    trainer.fit()
    ref = torch.stack([batches.extras["ref_chosen"], batches.extras["ref_rejected"]], dim=1)
    return {"clock": clock, "first_loss": records[0]["loss"], "ref": ref}


def throughput(clock: StepTimes, tokens: list[int], warmup: int) -> dict:
    n = sum(tokens[warmup:len(clock.cpu)])
    cpu, wall = sum(clock.cpu[warmup:]), sum(clock.wall[warmup:])
    return {"tokens_per_cpu_s": round(n / cpu, 1), "tokens_per_s": round(n / wall, 1)}


def fastest(runs: list[dict], tokens: list[int], warmup: int) -> dict:
    """The run with the most tokens per CPU-second, with its throughput."""
    best = max(runs, key=lambda r: throughput(r["clock"], tokens, warmup)["tokens_per_cpu_s"])
    return {**best, "throughput": throughput(best["clock"], tokens, warmup)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1, help="runs per side, alternating; the fastest is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    add_no_check(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs: dict[str, list[dict]] = {"trl": [], "llmlab": [], "llmlab_padded": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok, policy, reference = make_models(root)
        pairs = make_pairs(args.pairs_per_step * (args.warmup + args.steps))
        for _ in range(args.rounds):
            runs["trl"].append(run_trl(root, pairs, args))
            encoded = runs["trl"][0]["encoded"]
            runs["llmlab"].append(run_llmlab(policy, reference, encoded, args, packed=True))
            runs["llmlab_padded"].append(run_llmlab(policy, reference, encoded, args, packed=False))

    B = args.pairs_per_step
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in encoded]
    tokens = [sum(lengths[i * B:(i + 1) * B]) for i in range(args.warmup + args.steps)]
    best = {name: fastest(r, tokens, args.warmup) for name, r in runs.items()}
    import transformers
    import trl as trl_module

    result = {"benchmark": "dpo_step_throughput_cpu_fp32", "dims": {**DIMS, "vocab_size": tok.vocab_size},
              "pairs_per_step": B, "timed_steps": args.steps, "warmup_steps": args.warmup,
              "rounds": args.rounds, "tokens_per_step_mean": round(statistics.mean(tokens), 1), "beta": BETA,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl_module.__version__}
    for name, run in best.items():
        result[name] = run["throughput"]
    cpu = {name: run["throughput"]["tokens_per_cpu_s"] for name, run in best.items()}
    wall = {name: run["throughput"]["tokens_per_s"] for name, run in best.items()}
    result["ratio"] = round(cpu["llmlab"] / cpu["trl"], 3)
    result["ratio_padded"] = round(cpu["llmlab_padded"] / cpu["trl"], 3)
    result["ratio_wall"] = round(wall["llmlab"] / wall["trl"], 3)
    result["first_step_loss"] = {name: run["first_loss"] for name, run in best.items()}
    loss_gap = abs(best["llmlab"]["first_loss"] - best["trl"]["first_loss"])
    result["first_step_loss_gap"] = loss_gap
    result["ref_logps_max_gap"] = float((best["llmlab"]["ref"] - best["trl"]["ref"]).abs().max())
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    sys.exit(finish(result, {"ratio_vs_trl": goal(result["ratio"], ">=", 1.5),
                             "first_step_loss_gap": goal(loss_gap, "<=", 1e-4)}, args.no_check))


if __name__ == "__main__":
    main()
