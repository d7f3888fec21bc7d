"""Preference pairs from a model's own samples, labelled by a simulated rater.

    from llmlab.align.preferences import make_preferences, write_preferences
    records, stats = make_preferences(model, tok, read_prompt_set("data/tasks/train_prompts.jsonl"),
                                      rater="correct", noise=0.1, samples=4)

    llmlab data preferences runs/sft/ckpt-000400 --prompts data/tasks/train_prompts.jsonl --out prefs.jsonl

For each prompt the model samples `samples` answers (chat template, temperature, stop at end of turn); the
rater looks at the distinct answers, one pair it can order is drawn at random, and the rater's label says
which is chosen. Each label is flipped with probability `noise`.

The raters are stand-ins for human raters, which this project does not have:
  correct  prefers an answer the task's grader accepts to one it rejects; answers equally right (or equally
           wrong) are not ordered. With noise it is an honest but fallible rater.
  length   prefers the longer answer (in characters, surrounding whitespace ignored), whatever it says: the
           length bias real raters and the reward models trained on them are known to have. Issue 14 uses
           it on purpose, to show a policy optimised against a biased reward learning the bias.
A prompt whose answers the rater cannot order (all correct, all wrong, all the same length) yields no pair.

Output records are TRL's conversational preference format, {"prompt": [user], "chosen": [assistant],
"rejected": [assistant]}, plus what the rater knew: task, rater, chosen_correct, rejected_correct, flipped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from llmlab.data.tasks import TaskExample, grade, read_prompt_set
from llmlab.device import resolve_device
from llmlab.errors import ConfigError
from llmlab.evals.tasks import complete_chats, load_chat_model
from llmlab.fsutil import atomic_file, check_output

# A rater says whether answer a is better than answer b (True / False), or has no preference (None).
Rater = Callable[[TaskExample, str, str], bool | None]


def correct_rater(example: TaskExample, a: str, b: str) -> bool | None:
    ok_a, ok_b = grade(example.task, example, a), grade(example.task, example, b)
    return None if ok_a == ok_b else ok_a


def length_rater(example: TaskExample, a: str, b: str) -> bool | None:
    la, lb = len(a.strip()), len(b.strip())
    return None if la == lb else la > lb


RATERS: dict[str, Rater] = {"correct": correct_rater, "length": length_rater}


def get_rater(name: str) -> Rater:
    if name not in RATERS:
        raise ConfigError(f"unknown rater {name!r}; choose from {', '.join(RATERS)}")
    return RATERS[name]


def label_pairs(examples: Sequence[TaskExample], answers: Sequence[Sequence[str]], rater: str = "correct",
                noise: float = 0.0, seed: int = 0) -> tuple[list[dict], dict]:
    """One labelled pair per prompt whose answers the rater can order; (records, stats)."""
    if not 0.0 <= noise <= 0.5:
        raise ConfigError(f"noise={noise!r} must be in [0, 0.5] (a label flipped more often than not is "
                          "another rater)")
    judge = get_rater(rater)
    rng = random.Random(f"llmlab-preferences:{rater}:{seed}")
    records, flipped = [], 0
    correct = total = 0
    for example, options in zip(examples, answers, strict=True):
        correct += sum(grade(example.task, example, a) for a in options)
        total += len(options)
        distinct = list(dict.fromkeys(options))
        ordered = [(a, b, judge(example, a, b)) for i, a in enumerate(distinct) for b in distinct[i + 1:]]
        ordered = [(a, b) if better else (b, a) for a, b, better in ordered if better is not None]
        if not ordered:
            continue
        chosen, rejected = rng.choice(ordered)
        flip = rng.random() < noise
        if flip:
            chosen, rejected = rejected, chosen
            flipped += 1
        records.append(_record(example, chosen, rejected, rater, flip))
    stats = {"prompts": len(examples), "pairs": len(records), "ties": len(examples) - len(records),
             "flipped": flipped, "samples": total, "sample_accuracy": correct / total if total else 0.0,
             "rater": rater, "noise": noise}
    return records, stats


def _record(example: TaskExample, chosen: str, rejected: str, rater: str, flipped: bool) -> dict:
    return {"prompt": example.prompt_messages(), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "task": example.task, "rater": rater,
            "chosen_correct": grade(example.task, example, chosen),
            "rejected_correct": grade(example.task, example, rejected), "flipped": flipped}


def make_preferences(model, tok, examples: Sequence[TaskExample], rater: str = "correct", noise: float = 0.1,
                     samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 24,
                     batch_size: int = 64, seed: int = 0) -> tuple[list[dict], dict]:
    """Sample `samples` answers per prompt from the model and label pairs (module docstring)."""
    get_rater(rater)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"samples={samples!r}: a pair needs at least 2 answers per prompt")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0: greedy answers to one prompt are all "
                          "the same")
    chats = [e.prompt_messages() for e in examples for _ in range(samples)]
    flat = complete_chats(model, tok, chats, max_new_tokens, temperature=temperature, seed=seed,
                          batch_size=batch_size)
    answers = [flat[i:i + samples] for i in range(0, len(flat), samples)]
    return label_pairs(examples, answers, rater, noise, seed)


def write_preferences(checkpoint: str | Path, prompts: str | Path, out: str | Path, rater: str = "correct",
                      noise: float = 0.1, samples: int = 4, temperature: float = 1.0,
                      max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0, device: str = "auto",
                      overwrite: bool = False) -> dict:
    """make_preferences for a checkpoint and a prompt set; the pairs go to OUT (JSONL), all or nothing."""
    get_rater(rater)
    check_output(out, inputs=[checkpoint, prompts], overwrite=overwrite, what="--out")
    examples = read_prompt_set(prompts)
    model, tok, _ = load_chat_model(checkpoint, resolve_device(device))
    records, stats = make_preferences(model, tok, examples, rater, noise, samples, temperature,
                                      max_new_tokens, batch_size, seed)
    write_jsonl(out, records)
    return stats


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    with atomic_file(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
