"""SFT optimizer-step throughput on CPU: llmlab's SFT objective + Trainer vs TRL's SFTTrainer, one run.

Same everything: one small model (configs/cpu-demo.toml's GPT-2 shape by default, the model the cpu-chat
run fine-tunes; --flavour llama for the other) built by llmlab, exported with llmlab.model.hf.save_hf and
loaded by transformers for TRL, fp32, the same chat-formatted task data (llmlab.data.tasks, rendered with
the chat template to ids + assistant-only loss mask and handed to TRL pre-tokenized with that mask as
`completion_mask`, completion_only_loss=True), the same batches in the same order (TRL's sampler made
sequential, ours read in the order llmlab's batch source draws them), right padding to each batch's longest
row, AdamW (betas 0.9/0.95, no weight decay), grad clip 1.0, no gradient checkpointing on either side.

Figures: tokens per second over the steps after the first (real tokens, padding not counted; both sides see
the same tokens, so a ratio is the inverse ratio of step times), measured twice: per second of this
process's CPU time (`*_tokens_per_cpu_s`; with one torch thread it is what the wall clock shows on an idle
machine, and other processes on a shared machine barely move it) and per wall-clock second. The target is
`ratio` = llmlab / TRL in CPU time (>= 1.5; `wall_ratio` beside it), and the first step's loss on each side
(mean over the batch's kept tokens, target |difference| <= 1e-4). Each side runs --rounds times,
alternating, and keeps its fastest round (other processes only ever add time). With
peft installed the LoRA variant (rank 8 on the attention and MLP linears) is compared too; without it that
row is reported as unmeasured. Prints one JSON object ending with `targets`; exits 1 on a miss (0 with
--no-check).

    python benchmarks/bench_sft.py [--steps 12] [--batch 16] [--rounds 2] [--threads 1] [--flavour gpt2]
                                   [--vocab 4096] [--no-check]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llmlab.align.lora import LoRAConfig, apply_lora
from llmlab.align.sft import SFTBatches, encode_examples, pad_rows, sft_objective
from llmlab.data.chat_data import SFTExample, encode_sft
from llmlab.data.tasks import make_split
from llmlab.model import ModelConfig, Transformer
from llmlab.model.hf import save_hf
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.chat import with_chat_tokens
from llmlab.train import Callback, OptimConfig, TrainConfig, Trainer
from targets import add_no_check, finish, goal, unmeasured

DIMS = dict(n_layer=4, d_model=256, n_head=4, block_size=256)  # configs/cpu-demo.toml's model
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],  # peft's names for our attn.qkv/proj, mlp.fc/proj
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TASK_MIX = ("add", "mul", "count", "reverse", "sort", "lookup")
LR, LORA_RANK = 1e-4, 8


def make_data(n: int):
    """A tokenizer (BPE on the task texts, chat tokens added) and n task examples, each (ids, loss_mask)."""
    per = -(-n // len(TASK_MIX))
    examples = [e for t in TASK_MIX for e in make_split(t, "train", per, seed=0)][:n]
    tok = Tokenizer.train([f"{e.prompt} {e.answer}" for e in examples], vocab_size=1024, progress=False,
                          workers=1)
    tok, _ = with_chat_tokens(tok)
    encoded = [encode_sft(tok, SFTExample(e.messages())) for e in examples]
    return tok, encoded


def base_model(flavour: str, vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(flavour, "mini", vocab_size=vocab, **DIMS))


class StepClock(Callback):
    """Wall-clock time at the end of every optimizer step, and each step's logged loss."""

    name = "step_clock"

    def __init__(self):
        self.times, self.losses = [now()], []

    def on_step_end(self, trainer, record):
        self.times.append(now())
        self.losses.append(record["loss"])


def run_llmlab(model_dir: Path, rows, batch: int, steps: int, lora: bool) -> dict:
    model = Transformer.load(model_dir / "llmlab")
    if lora:
        apply_lora(model, LoRAConfig(rank=LORA_RANK, alpha=2 * LORA_RANK))
    batches = SFTBatches(rows, batch, pad_id=0, packed=False, seed=0)
    clock = StepClock()
    optim = OptimConfig(lr=LR, warmup_steps=0, max_steps=steps, weight_decay=0.0, min_lr_ratio=1.0)
    Trainer(model, sft_objective(), batches, optim,
            TrainConfig(device="cpu", progress=False, plot=False, eval_every=0), callbacks=[clock]).fit()
    return {"step_ends": clock.times, "first_loss": clock.losses[0]}


def run_trl(model_dir: Path, ordered, batch: int, steps: int, lora: bool, out: Path) -> dict:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times, first = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(now())

    class InOrder(SFTTrainer):
        """SFTTrainer reading the dataset in order (the batches llmlab reads), recording its first loss."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            if not first:
                first.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                 target_modules=LORA_TARGETS[model.config.model_type])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, completion_only_loss=True,
                     max_length=DIMS["block_size"], packing=False, padding_free=False, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0)
    records = [{"input_ids": [int(i) for i in ids], "completion_mask": [int(k) for k in m]}
               for ids, m in ordered]
    data = datasets.Dataset.from_list(records)
    trainer = InOrder(model=model, args=args, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()],
                      peft_config=peft_config)
    trainer.train()
    return {"step_ends": times, "first_loss": first[0]}


def step_tokens(ordered, batch: int, steps: int) -> list[int]:
    """Real (unpadded) input tokens of each step's batch: len(ids) - 1 per example."""
    lengths = [len(ids) - 1 for ids, _ in ordered]
    return [sum(lengths[s * batch:(s + 1) * batch]) for s in range(steps)]


def now() -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


def tokens_per_s(step_ends: list[tuple[float, float]], tokens: list[int], clock: int) -> float:
    """Tokens of steps 2..N over their time (the first step pays for warm-up on both sides); clock 0: wall
    time, 1: the process's CPU time."""
    return sum(tokens[1:]) / (step_ends[-1][clock] - step_ends[1][clock])


def compare(model_dir: Path, encoded, batch: int, steps: int, rounds: int, lora: bool, tmp: Path) -> dict:
    rows = pad_rows(encode_examples(encoded, DIMS["block_size"]))
    # The order llmlab's batch source reads its rows (one epoch of exactly `steps` batches).
    order = SFTBatches(rows, batch, pad_id=0, packed=False, seed=0)._order(0)
    assert len(rows) == len(encoded), "an example was cut to nothing: raise DIMS[\"block_size\"]"
    ordered = [encoded[i] for i in order]
    tokens = step_tokens(ordered, batch, steps)
    best = {(name, clock): 0.0 for name in ("llmlab", "trl") for clock in (0, 1)}
    losses = {}
    for r in range(rounds):
        ours = run_llmlab(model_dir, rows, batch, steps, lora)
        with contextlib.redirect_stdout(sys.stderr):  # transformers prints its log dicts
            theirs = run_trl(model_dir / "hf", ordered, batch, steps, lora, tmp / f"trl-{int(lora)}-{r}")
        for name, res in (("llmlab", ours), ("trl", theirs)):
            for clock in (0, 1):
                best[name, clock] = max(best[name, clock], tokens_per_s(res["step_ends"], tokens, clock))
            losses[name] = res["first_loss"]
    return {"llmlab_tokens_per_cpu_s": best["llmlab", 1], "trl_tokens_per_cpu_s": best["trl", 1],
            "ratio": best["llmlab", 1] / best["trl", 1],
            "llmlab_tokens_per_s": best["llmlab", 0], "trl_tokens_per_s": best["trl", 0],
            "wall_ratio": best["llmlab", 0] / best["trl", 0],
            "llmlab_first_loss": losses["llmlab"], "trl_first_loss": losses["trl"],
            "first_loss_diff": abs(losses["llmlab"] - losses["trl"])}


def llmlab_only(model_dir: Path, encoded, batch: int, steps: int, rounds: int) -> dict:
    """llmlab's LoRA SFT alone (when TRL's side cannot run): its tokens/s and first loss, for the record."""
    rows = pad_rows(encode_examples(encoded, DIMS["block_size"]))
    order = SFTBatches(rows, batch, pad_id=0, packed=False, seed=0)._order(0)
    tokens = step_tokens([encoded[i] for i in order], batch, steps)
    runs = [run_llmlab(model_dir, rows, batch, steps, lora=True) for _ in range(rounds)]
    return {"llmlab_tokens_per_cpu_s": max(tokens_per_s(r["step_ends"], tokens, 1) for r in runs),
            "llmlab_tokens_per_s": max(tokens_per_s(r["step_ends"], tokens, 0) for r in runs),
            "llmlab_first_loss": runs[0]["first_loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16, help="examples per optimizer step (one micro-batch)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, alternating; the fastest is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--flavour", choices=("gpt2", "llama"), default="gpt2",
                    help="model flavour (gpt2: the cpu-demo model that cpu-chat fine-tunes)")
    ap.add_argument("--vocab", type=int, default=4096,
                    help="model vocabulary (cpu-demo's 4096; the task tokenizer uses the first ids)")
    add_no_check(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok, encoded = make_data(args.steps * args.batch)
    model = base_model(args.flavour, max(args.vocab, tok.vocab_size))
    result = {"benchmark": "sft", "torch_threads": args.threads, "steps": args.steps, "batch": args.batch,
              "model": {**DIMS, "flavour": args.flavour, "vocab_size": model.config.vocab_size,
                        "tokenizer_vocab": tok.vocab_size, "params": model.num_params()},
              "mean_example_tokens": float(np.mean([len(ids) for ids, _ in encoded]))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save(tmp / "llmlab")
        save_hf(model, tmp / "hf", tokenizer=tok)
        full = compare(tmp, encoded, args.batch, args.steps, args.rounds, False, tmp)
        result["full"] = full
        targets = {"ratio": goal(round(full["ratio"], 3), ">=", 1.5),
                   "first_loss_diff": goal(full["first_loss_diff"], "<=", 1e-4)}
        if importlib.util.find_spec("peft") is not None:
            lora = compare(tmp, encoded, args.batch, args.steps, args.rounds, True, tmp)
            result["lora"] = lora
            targets["lora_ratio"] = goal(round(lora["ratio"], 3), ">=", 1.5)
            targets["lora_first_loss_diff"] = goal(lora["first_loss_diff"], "<=", 1e-4)
        else:
            targets["lora_ratio"] = unmeasured(">=", 1.5, "peft is not installed (TRL's LoRA needs it)")
            result["lora"] = llmlab_only(tmp, encoded, args.batch, args.steps, args.rounds)
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
