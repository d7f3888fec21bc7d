"""Accuracy on the verifiable tasks (llmlab.data.tasks): greedy chat answers, graded exactly.

    from llmlab.evals.tasks import evaluate_tasks, evaluate_task_checkpoints
    result = evaluate_tasks(model, tok, make_split("add", "test", 100))   # {"tasks": {...}, "overall": ...}

    llmlab eval tasks runs/sft/ckpt-000400 runs/dpo/ckpt-000200 --out tasks.json   # + tasks.png

Each prompt is rendered with the tokenizer's chat template up to the assistant header, the model answers
greedily (batched, each row stopping at its end-of-turn token), and the answer is graded by the task's exact
grader. Accuracy comes with the number of prompts and a 95% Wilson score interval, which stays inside [0, 1]
and is honest for the small n and the accuracies near 0 or 1 that tiny models give.

A checkpoint whose tokenizer has no chat template (a base model straight from pretraining) is asked through
llmlab's template all the same: the missing chat tokens are added and the embedding grown as fine-tuning
would do it, so base and fine-tuned models answer the same prompts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from llmlab.data.tasks import (
    TASKS,
    TaskExample,
    grade,
    mixture,
    parse_difficulty,
    parse_task_names,
    read_prompt_set,
)
from llmlab.device import resolve_device
from llmlab.errors import CheckpointError, ModelError
from llmlab.fsutil import write_bytes_atomic
from llmlab.infer.generate import generate
from llmlab.infer.quant import load_model
from llmlab.model.resize import add_chat_tokens
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
SAMPLES_PER_TASK = 3     # answers kept in the result per task, for reports


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n the bounds are exactly 0 and 1; computed, they come out a rounding error inside.
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def complete_chats(model, tok, conversations: Sequence[list[dict]], max_new_tokens: int,
                   temperature: float = 0.0, seed: int | None = None, batch_size: int = 64,
                   top_k: int | None = None) -> list[str]:
    """The assistant's reply to each conversation, in batches: the text up to its end-of-turn token, or up to
    any other special token it writes first (a reply holds no control tokens).

    max_new_tokens is cut to what the context leaves after a batch's longest prompt. With temperature > 0
    each batch draws from its own seed (seed + batch index), so the result is deterministic for a seed."""
    template = tok.chat_template
    stops = list(template.stop_ids)
    specials = set(tok.special_tokens.values())
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True)[0] for c in conversations]
    replies = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        longest = max(map(len, batch))
        room = model.config.block_size - longest
        if room < 1:
            raise ModelError(f"a chat prompt of {longest} tokens leaves no room for an answer in the model's "
                             f"context of {model.config.block_size}; shorten the prompts")
        out = generate(model, batch, min(max_new_tokens, room), temperature=temperature, top_k=top_k,
                       seed=None if seed is None else seed + b // batch_size, stop=stops, pad_id=-1)
        for prompt, row in zip(batch, out.tolist(), strict=True):
            replies.append(tok.decode(_reply_ids(row[len(prompt):], specials)))
    return replies


def _reply_ids(new: list[int], specials: set[int]) -> list[int]:
    reply = []
    for t in new:
        if t in specials or t < 0:
            break
        reply.append(t)
    return reply


def answer_budget(tok, examples: Sequence[TaskExample]) -> int:
    """New tokens to allow: twice the longest answer's tokens plus room for end of turn (a model may spell
    an answer in more tokens than the tokenizer's own encoding)."""
    return 2 * max(len(tok.encode(e.answer)) for e in examples) + 4


@torch.no_grad()
def evaluate_tasks(model, tok, examples: Sequence[TaskExample], batch_size: int = 64,
                   max_new_tokens: int | None = None, details: bool = False) -> dict:
    """Greedy accuracy per task: {"tasks": {task: {n, correct, accuracy, ci95}}, "overall": {...},
    "samples": [{task, prompt, answer, response, correct}, ...] (the first few per task)}; with `details`
    also "graded": each example's correctness in order (for paired comparisons of models)."""
    budget = answer_budget(tok, examples) if max_new_tokens is None else max_new_tokens
    replies = complete_chats(model, tok, [e.prompt_messages() for e in examples], budget,
                             batch_size=batch_size)
    per_task: dict[str, list[int]] = {}
    samples, graded = [], []
    for e, reply in zip(examples, replies, strict=True):
        ok = grade(e.task, e, reply)
        graded.append(ok)
        counts = per_task.setdefault(e.task, [0, 0])
        counts[0] += ok
        counts[1] += 1
        if counts[1] <= SAMPLES_PER_TASK:
            samples.append({"task": e.task, "prompt": e.prompt, "answer": e.answer, "response": reply,
                            "correct": ok})
    tasks = {t: _accuracy(*per_task[t]) for t in sorted(per_task, key=list(TASKS).index)}  # registry order
    total = sum(c for c, _ in per_task.values()), len(examples)
    result = {"tasks": tasks, "overall": _accuracy(*total), "max_new_tokens": budget, "samples": samples}
    return {**result, "graded": graded} if details else result


def _accuracy(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [lo, hi]}


# ----- checkpoints -----
def load_chat_model(checkpoint: str | Path, device="cpu"):
    """(model, tokenizer, note) of a checkpoint, ready for chat prompts; note says what was added to a
    tokenizer without a chat template ("" if nothing)."""
    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, device=device)
    tok_dir = checkpoint / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no tokenizer/ directory; evaluate a checkpoint "
                              "written by llmlab pretrain/sft/dpo (they copy their tokenizer)")
    tok = Tokenizer.load(tok_dir)
    require_same_tokenizer(checkpoint_tokenizer(checkpoint, model.config.vocab_size),
                           directory_tokenizer(tok_dir, tok), "restore the checkpoint's tokenizer/ copy")
    model, tok, message = add_chat_tokens(model, tok)
    note = f"{checkpoint} has no chat template: {message}" if message else ""
    return model.eval(), tok, note


def task_examples(prompts: str | Path | None = None, tasks: str | list[str] | None = None, n: int = 100,
                  difficulty: str | dict | None = None, seed: int = 0) -> list[TaskExample]:
    """A prompt set from a file (`llmlab data tasks`' test_prompts.jsonl), or n test prompts per task."""
    if prompts is not None:
        return read_prompt_set(prompts)
    return mixture(parse_task_names(tasks), "test", n, parse_difficulty(difficulty), seed)


def evaluate_task_checkpoints(checkpoints: Sequence[str | Path], examples: Sequence[TaskExample],
                              batch_size: int = 64, max_new_tokens: int | None = None,
                              device: str = "cpu", log=print) -> list[dict]:
    """evaluate_tasks for each checkpoint (all on the same examples), with "checkpoint" and "note" added."""
    dev = resolve_device(device)
    rows = []
    for path in checkpoints:
        model, tok, note = load_chat_model(path, dev)
        if note:
            log(note)
        result = evaluate_tasks(model, tok, examples, batch_size, max_new_tokens)
        rows.append({"checkpoint": str(path), **result, **({"note": note} if note else {})})
    return rows


def plot_task_accuracy(rows: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """A grouped bar chart (one group per task, one bar per result row) with 95% intervals, as PNG."""
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else [_short(r["checkpoint"]) for r in rows]
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    groups = [*tasks, "overall"]
    width = 0.8 / len(rows)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(rows)) ** 0.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        stats = [row["tasks"].get(t) or {"accuracy": 0.0, "ci95": [0.0, 0.0]} for t in tasks]
        stats.append(row["overall"])
        acc = [s["accuracy"] for s in stats]
        err = [[a - s["ci95"][0] for a, s in zip(acc, stats, strict=True)],
               [s["ci95"][1] - a for a, s in zip(acc, stats, strict=True)]]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=label)
    n = rows[0]["overall"]["n"] if rows else 0
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (greedy, exact match)")
    ax.set_title(f"task accuracy with 95% Wilson intervals ({n} test prompts)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def _short(checkpoint: str) -> str:
    parts = Path(checkpoint).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else checkpoint
