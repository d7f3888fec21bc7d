"""`llmlab speedrun --preset cpu-chat`: post-training end to end on the verifiable tasks, with a report.

    llmlab speedrun --preset cpu-chat --out runs/chat
    llmlab speedrun --preset cpu-chat base.checkpoint=runs/demo/ckpt-000500   # start from a given model

Stages, each leaving files the next one reads (and each skipped when its output is complete and made with
the same settings, so an interrupted run resumes):
  1. base model: base.checkpoint, else the finished cpu-demo speedrun in base.demo_run (its report.json
     names its checkpoint), else a short cpu-demo speedrun into OUT/base          -> a pretrained checkpoint
  2. task data: SFT examples from the train split, prompt sets                     -> OUT/tasks/
  3. SFT of the base model on the tasks (chat tokens added)                        -> OUT/sft/
  4. preferences: the SFT model's own samples on train prompts, labelled by the
     noisy `correct` rater, split into train and held-out pairs                    -> OUT/preferences/
  5. a reward model on the SFT backbone (Bradley-Terry)                            -> OUT/reward/
  6. DPO of the SFT model on the same pairs (the SFT model as reference)           -> OUT/dpo/
  7. greedy accuracy of base, SFT and DPO on the same test prompts, and a report   -> OUT/report.md

Accuracies come with n and a 95% Wilson interval; SFT against base and DPO against SFT are also compared
prompt by prompt (the same prompts for both) with an exact McNemar test, so "DPO beats SFT" is claimed only
when the paired difference is unlikely to be noise. The reward model's held-out accuracy is measured twice:
against the rater's (noisy) labels, and against the truth (is the chosen answer the correct one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from llmlab.align.dpo import DPOConfig, run_dpo
from llmlab.align.preferences import make_preferences, write_jsonl
from llmlab.align.reward import RewardConfig, run_reward, score_sequences
from llmlab.align.sft import SFTConfig, run_sft
from llmlab.config import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    find_preset,
    load_config,
    read_toml,
    to_toml,
)
from llmlab.data.chat_data import encode_preference, read_preferences
from llmlab.data.tasks import (
    TASKS,
    mixture,
    parse_difficulty,
    parse_task_names,
    read_prompt_set,
    write_task_data,
)
from llmlab.device import resolve_device
from llmlab.errors import DataError
from llmlab.evals.tasks import evaluate_tasks, load_chat_model, plot_task_accuracy, wilson_interval
from llmlab.fsutil import check_output, remove_path, write_text_atomic
from llmlab.model import Transformer
from llmlab.model.transformer import read_config
from llmlab.speedrun import run_speedrun
from llmlab.tokenizer import Tokenizer

PIPELINE = "chat"
MODELS = ("base", "sft", "dpo")


@dataclass
class BaseStage:
    checkpoint: str = ""            # start from this pretrained checkpoint; "" -> demo_run's, else pretrain
    demo_run: str = "runs/demo"     # a finished `llmlab speedrun --preset cpu-demo` to reuse when present
    preset: str = "cpu-demo"        # otherwise this speedrun preset pretrains one into OUT/base ...
    overrides: list[str] = field(default_factory=lambda: ["pretrain.optim.max_steps=300"])  # ... so changed


@dataclass
class TaskStage:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    difficulty: dict[str, int] = field(default_factory=dict)   # per task; unnamed tasks keep their default
    train_per_task: PositiveInt = 2000  # SFT examples per task
    test_per_task: PositiveInt = 100    # test prompts (distinct problems) per task
    seed: NonNegativeInt = 0


@dataclass
class PreferenceStage:
    prompts_per_task: PositiveInt = 150  # train-split prompts the SFT model answers
    rater: Literal["correct", "length"] = "correct"
    noise: Annotated[float, Range(ge=0, le=0.5)] = 0.1  # probability a label is flipped
    samples: Annotated[int, Range(ge=2)] = 4            # answers per prompt
    temperature: PositiveFloat = 1.0
    max_new_tokens: PositiveInt = 16
    heldout_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.15  # pairs held out to measure the reward
                                                                   # model (and DPO's val metrics)
    seed: NonNegativeInt = 0


@dataclass
class EvalStage:
    batch_size: PositiveInt = 64
    samples_per_task: NonNegativeInt = 2  # prompts per task shown in the report with every model's answer


@dataclass
class ChatSpeedrunConfig:
    pipeline: Literal["chat"] = PIPELINE
    base: BaseStage = field(default_factory=BaseStage)
    tasks: TaskStage = field(default_factory=TaskStage)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferenceStage = field(default_factory=PreferenceStage)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalStage = field(default_factory=EvalStage)


def is_chat_preset(name: str) -> bool:
    """Whether a speedrun preset (name or TOML path) is a post-training one (pipeline = "chat")."""
    return read_toml(find_preset(name, "llmlab.presets")).get("pipeline") == PIPELINE


def load_chat_preset(name: str, overrides: list[str] | tuple = ()) -> ChatSpeedrunConfig:
    """Defaults <- the preset file <- key=value overrides, checked before any stage runs (a base checkpoint
    that is given must exist)."""
    cfg = load_config(ChatSpeedrunConfig, find_preset(name, "llmlab.presets"), overrides)
    parse_task_names(cfg.tasks.tasks)
    parse_difficulty(cfg.tasks.difficulty)
    if cfg.base.checkpoint:
        read_config(Path(cfg.base.checkpoint))
    return cfg


# ----- stage bookkeeping -----
class Stages:
    """Runs each stage once per settings. Stages form a chain: a stage's stamp (OUT/NAME.settings.json) holds
    a digest of its settings and of every earlier stage's, so a stage is reused only when its output is
    complete and nothing it depends on changed. Times are recorded (None for a reused stage)."""

    count = 7

    def __init__(self, out: Path):
        self.out = out
        self.seconds: dict[str, float | None] = {}
        self.chain = ""

    def _link(self, settings) -> str:
        text = json.dumps(settings, sort_keys=True, default=str)
        self.chain = hashlib.sha256(f"{self.chain}\n{text}".encode()).hexdigest()
        return self.chain

    def given(self, index: int, name: str, settings, message: str) -> None:
        """A stage whose output is given (not made here): it only joins the chain."""
        self._link(settings)
        print(f"[{index}/{self.count}] {name}: {message}")
        self.seconds[name] = None

    def run(self, index: int, name: str, settings, done: Path, work, describe: str):
        stamp = self.out / f"{name}.settings.json"
        chain = self._link(settings)
        if done.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("chain") == chain:
            print(f"[{index}/{self.count}] {name}: reusing {done}")
            self.seconds[name] = None
            return json.loads(done.read_text())
        print(f"[{index}/{self.count}] {name}: {describe}")
        remove_path(stamp)
        t0 = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - t0
        record = {"chain": chain, "settings": settings}
        write_text_atomic(stamp, json.dumps(record, indent=2, default=str) + "\n")
        return result


def _summary_checkpoint(summary: dict) -> str:
    """A run's final checkpoint. Not the best by held-out metric: the held-out pairs also measure the reward
    model, and choosing on them would flatter it."""
    return summary["checkpoint"]


# ----- stages -----
def _stage_base(cfg: ChatSpeedrunConfig, out: Path, stages: Stages) -> str:
    b = cfg.base
    if b.checkpoint:
        stages.given(1, "base", {"checkpoint": b.checkpoint}, b.checkpoint)
        return b.checkpoint
    demo = Path(b.demo_run) / "report.json"
    if demo.is_file():
        ckpt = json.loads(demo.read_text()).get("checkpoint", "")
        if ckpt and (Path(ckpt) / "model.safetensors").is_file():
            stages.given(1, "base", {"checkpoint": ckpt}, f"reusing the {b.demo_run} speedrun's {ckpt}")
            return ckpt
    base_dir = out / "base"
    fig = stages.run(1, "base", {"preset": b.preset, "overrides": b.overrides}, base_dir / "report.json",
                     lambda: run_speedrun(b.preset, base_dir, b.overrides),
                     f"pretraining with the {b.preset} speedrun ({' '.join(b.overrides)}) into {base_dir}")
    return fig["checkpoint"]


def _stage_tasks(cfg: ChatSpeedrunConfig, out: Path, stages: Stages) -> Path:
    t = cfg.tasks
    directory = out / "tasks"
    stages.run(2, "tasks", dataclasses.asdict(t), directory / "tasks.json",
               lambda: write_task_data(directory, t.tasks, t.train_per_task, t.test_per_task,
                                       parse_difficulty(t.difficulty), t.seed),
               f"{t.train_per_task} SFT examples and {t.test_per_task} test prompts per task "
               f"({', '.join(t.tasks)})")
    return directory


def _stage_sft(cfg: ChatSpeedrunConfig, out: Path, base: str, tasks: Path, stages: Stages) -> dict:
    sft = dataclasses.replace(
        cfg.sft, checkpoint=base,
        data=dataclasses.replace(cfg.sft.data, train=str(tasks / "train.jsonl")),
        train=dataclasses.replace(cfg.sft.train, out_dir=str(out), run_name="sft", overwrite=True))
    return stages.run(3, "sft", dataclasses.asdict(sft), out / "sft" / "summary.json",
                      lambda: run_sft(sft, say=print),
                      f"fine-tuning {base} for {sft.optim.max_steps} steps")


def _stage_preferences(cfg: ChatSpeedrunConfig, out: Path, sft_ckpt: str, stages: Stages) -> dict:
    p = cfg.preferences
    directory = out / "preferences"
    settings = {**dataclasses.asdict(p), "batch_size": cfg.eval.batch_size}  # batches draw their own seeds

    def work() -> dict:
        t = cfg.tasks
        prompts = mixture(t.tasks, "train", p.prompts_per_task, parse_difficulty(t.difficulty), t.seed + 1)
        model, tok, _ = load_chat_model(sft_ckpt, resolve_device(cfg.sft.train.device))
        records, stats = make_preferences(model, tok, prompts, p.rater, p.noise, p.samples, p.temperature,
                                          p.max_new_tokens, cfg.eval.batch_size, p.seed)
        train, heldout = _split_pairs(records, p.heldout_fraction, p.seed)
        if not train or not heldout:
            raise_too_few(len(records))
        write_jsonl(directory / "train.jsonl", train)
        write_jsonl(directory / "heldout.jsonl", heldout)
        stats.update(train_pairs=len(train), heldout_pairs=len(heldout))
        write_text_atomic(directory / "stats.json", json.dumps(stats, indent=2) + "\n")
        return stats

    return stages.run(4, "preferences", settings, directory / "stats.json", work,
                      f"{p.samples} samples for each of {p.prompts_per_task} prompts per task, "
                      f"rater {p.rater} with noise {p.noise}")


def raise_too_few(pairs: int) -> None:
    raise DataError(f"the SFT model's samples gave only {pairs} preference pair(s), too few to hold some "
                    "out; raise preferences.prompts_per_task or preferences.samples, or train SFT longer")


def _split_pairs(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(f"llmlab-chat-heldout:{seed}").shuffle(order)
    n_held = max(1, round(fraction * len(records))) if records else 0
    held = set(order[:n_held])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _stage_reward(cfg: ChatSpeedrunConfig, out: Path, sft_ckpt: str, prefs: Path, stages: Stages) -> dict:
    rm = dataclasses.replace(
        cfg.reward, checkpoint=sft_ckpt,
        data=dataclasses.replace(cfg.reward.data, train=str(prefs / "train.jsonl"),
                                 val=str(prefs / "heldout.jsonl")),
        train=dataclasses.replace(cfg.reward.train, out_dir=str(out), run_name="reward", overwrite=True))
    return stages.run(5, "reward", dataclasses.asdict(rm), out / "reward" / "summary.json",
                      lambda: run_reward(rm, say=print),
                      f"a reward model on the SFT backbone, {rm.optim.max_steps} steps")


def _stage_dpo(cfg: ChatSpeedrunConfig, out: Path, sft_ckpt: str, prefs: Path, stages: Stages) -> dict:
    dpo = dataclasses.replace(
        cfg.dpo, checkpoint=sft_ckpt,
        data=dataclasses.replace(cfg.dpo.data, train=str(prefs / "train.jsonl"),
                                 val=str(prefs / "heldout.jsonl")),
        train=dataclasses.replace(cfg.dpo.train, out_dir=str(out), run_name="dpo", overwrite=True))
    return stages.run(6, "dpo", dataclasses.asdict(dpo), out / "dpo" / "summary.json",
                      lambda: run_dpo(dpo, say=print),
                      f"DPO from the SFT model, beta {dpo.dpo.beta}, {dpo.optim.max_steps} steps")


def reward_accuracy(checkpoint: str, prefs_file: Path, device) -> dict:
    """Held-out accuracy of a reward model: how often it scores chosen above rejected (agreement with the
    rater's labels, noise included), and, over the pairs of one right and one wrong answer, how often it
    scores the right one higher (agreement with the truth)."""
    model = Transformer.load(checkpoint, device=device).eval()
    tok = Tokenizer.load(Path(checkpoint) / "tokenizer")
    pairs = read_preferences(prefs_file)
    chosen, rejected = [], []
    for pair in pairs:
        prompt_ids, c, r = encode_preference(tok, pair)
        chosen.append(prompt_ids + c)
        rejected.append(prompt_ids + r)
    agree = [a > b for a, b in zip(score_sequences(model, chosen, device=device),
                                   score_sequences(model, rejected, device=device), strict=True)]
    truth = [ok == bool(p.extra.get("chosen_correct")) for ok, p in zip(agree, pairs, strict=True)
             if p.extra.get("chosen_correct") != p.extra.get("rejected_correct")]
    return {"n": len(agree), "label_accuracy": sum(agree) / len(agree),
            "label_ci95": list(wilson_interval(sum(agree), len(agree))),
            "n_truth": len(truth), "true_accuracy": sum(truth) / len(truth) if truth else None,
            "true_ci95": list(wilson_interval(sum(truth), len(truth)))}


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact two-sided McNemar test of paired correctness: prompts only `a` gets right, only `b` gets right,
    and the probability of a split at least this uneven if neither model were better."""
    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def _stage_eval(cfg: ChatSpeedrunConfig, out: Path, checkpoints: dict[str, str], tasks: Path,
                stages: Stages) -> dict[str, dict]:
    examples = read_prompt_set(tasks / "test_prompts.jsonl")
    device = resolve_device(cfg.sft.train.device)
    print(f"[7/{stages.count}] eval: greedy answers of {', '.join(checkpoints)} to {len(examples)} test "
          "prompts")
    t0 = time.perf_counter()
    results = {}
    for name, ckpt in checkpoints.items():
        model, tok, note = load_chat_model(ckpt, device)
        if note:
            print(note)
        results[name] = {"checkpoint": ckpt, **evaluate_tasks(model, tok, examples, cfg.eval.batch_size,
                                                              details=True)}
        write_text_atomic(out / "eval" / f"{name}.json", json.dumps(results[name], indent=2) + "\n")
    plot_task_accuracy(list(results.values()), out / "eval" / "tasks.png", labels=list(results))
    stages.seconds["eval"] = time.perf_counter() - t0
    return results


# ----- the run -----
def run_chat_speedrun(preset: str = "cpu-chat", out: str | Path = "runs/chat", overrides: list[str] = (),
                      overwrite: bool = False) -> dict:
    """Run all stages of a chat preset into `out`; return the report's figures (module docstring)."""
    cfg = load_chat_preset(preset, overrides)
    out = Path(out)
    check_output(out, inputs=[cfg.base.checkpoint or None], overwrite=overwrite, into=True, what="--out",
                 reusable=lambda p: (p / "speedrun.toml").is_file())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "speedrun.toml", to_toml(cfg))
    started = time.perf_counter()
    stages = Stages(out)
    base = _stage_base(cfg, out, stages)
    tasks = _stage_tasks(cfg, out, stages)
    sft = _stage_sft(cfg, out, base, tasks, stages)
    sft_ckpt = _summary_checkpoint(sft)
    prefs = _stage_preferences(cfg, out, sft_ckpt, stages)
    reward = _stage_reward(cfg, out, sft_ckpt, out / "preferences", stages)
    dpo = _stage_dpo(cfg, out, sft_ckpt, out / "preferences", stages)
    results = _stage_eval(cfg, out, {"base": base, "sft": sft_ckpt, "dpo": _summary_checkpoint(dpo)}, tasks,
                          stages)
    device = resolve_device(cfg.sft.train.device)
    fig = {
        "preset": preset, "device": str(device), "base_checkpoint": base,
        "difficulty": json.loads((tasks / "tasks.json").read_text())["difficulty"],
        "seconds": {**stages.seconds, "total": time.perf_counter() - started},
        "accuracy": {name: {"tasks": r["tasks"], "overall": r["overall"], "checkpoint": r["checkpoint"]}
                     for name, r in results.items()},
        "sft_vs_base": mcnemar(results["sft"]["graded"], results["base"]["graded"]),
        "dpo_vs_sft": mcnemar(results["dpo"]["graded"], results["sft"]["graded"]),
        "preferences": prefs, "reward_model": reward_accuracy(_summary_checkpoint(reward),
                                                            out / "preferences" / "heldout.jsonl", device),
        "summaries": {"sft": sft, "reward": reward, "dpo": dpo},
    }
    write_text_atomic(out / "report.json", json.dumps(fig, indent=2) + "\n")
    write_text_atomic(out / "report.md", report_markdown(fig, results, cfg, out))
    print(f"[done] {out / 'report.md'}")
    return fig


# ----- the report -----
def _pct(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]"


def _verdict(name_a: str, name_b: str, test: dict, acc_a: float, acc_b: float) -> str:
    diff = acc_a - acc_b
    line = (f"{name_a} {diff:+.1%} overall against {name_b}: {test['a_only']} test prompts only {name_a} "
            f"answers right, {test['b_only']} only {name_b}; exact McNemar p = {test['p_value']:.2g}")
    if test["p_value"] < 0.05:
        return f"{line}. {name_a} is {'better' if diff > 0 else 'worse'} than {name_b} on these tasks."
    return f"{line}. The difference could be noise: no claim that either is better."


def _seconds(value) -> str:
    return "reused" if value is None else f"{value:.0f} s"


def _metric_lines(summary: dict) -> list[str]:
    """The held-out metrics a run ended with (val_loss, val_accuracy, val_rewards/margins, ...)."""
    return [f"{k} {v:.4g}" for k, v in summary.items() if k.startswith("val_") and isinstance(v, float)]


def _figure(out: Path, path: str, caption: str) -> list[str]:
    return [f"![{caption}]({path})", ""] if (out / path).is_file() else []


def report_markdown(fig: dict, results: dict[str, dict], cfg: ChatSpeedrunConfig, out: Path) -> str:
    acc = fig["accuracy"]
    tasks = list(acc["base"]["tasks"])
    n = acc["base"]["overall"]["n"]
    levels = ", ".join(f"{t}={d}" for t, d in fig["difficulty"].items())
    lines = [
        "# llmlab chat speedrun report", "",
        f"Preset `{fig['preset']}`, device {fig['device']}, base model `{fig['base_checkpoint']}`. Tasks "
        f"(llmlab/data/tasks.py) at difficulty {levels}; test problems never occur in training.", "",
        "| stage | time |", "| --- | --- |",
        *(f"| {k} | {_seconds(v)} |" for k, v in fig["seconds"].items()), "",
        f"## Task accuracy ({n} test prompts, greedy, exact match, 95% Wilson interval)", "",
        "| task | n | base | SFT | DPO |", "| --- | --- | --- | --- | --- |",
    ]
    for t in tasks:
        lines.append(f"| {t} | {acc['base']['tasks'][t]['n']} | "
                     + " | ".join(_pct(acc[m]["tasks"][t]) for m in MODELS) + " |")
    lines.append(f"| **overall** | {n} | " + " | ".join(_pct(acc[m]["overall"]) for m in MODELS) + " |")
    overall = {m: acc[m]["overall"]["accuracy"] for m in MODELS}
    lines += ["", "![task accuracy](eval/tasks.png)", "",
              f"- {_verdict('SFT', 'base', fig['sft_vs_base'], overall['sft'], overall['base'])}",
              f"- {_verdict('DPO', 'SFT', fig['dpo_vs_sft'], overall['dpo'], overall['sft'])}", ""]
    p, rm = fig["preferences"], fig["reward_model"]
    lines += [
        "## Preferences and the reward model", "",
        f"The SFT model answered {p['prompts']} train prompts {cfg.preferences.samples} times each at "
        f"temperature {cfg.preferences.temperature} ({p['sample_accuracy']:.1%} of the answers correct). "
        f"The simulated `{p['rater']}` rater, a stand-in for human raters, ordered {p['pairs']} pairs "
        f"({p['ties']} prompts had no pair it could order) and flipped {p['flipped']} labels "
        f"(noise {p['noise']}); "
        f"{p['train_pairs']} pairs train the reward model and DPO, {p['heldout_pairs']} are held out.", "",
        f"Reward model on the {rm['n']} held-out pairs: agrees with the rater's labels on "
        f"{rm['label_accuracy']:.1%} [{rm['label_ci95'][0]:.1%}, {rm['label_ci95'][1]:.1%}] (the rater flips "
        f"each label with probability {p['noise']}, so even a perfect judge of what it prefers agrees with "
        f"about {1 - p['noise']:.0%}).", "",
    ]
    if rm["true_accuracy"] is not None:
        lines += [f"Of the {rm['n_truth']} held-out pairs of one right and one wrong answer, it scores the "
                  f"right one higher on {rm['true_accuracy']:.1%} [{rm['true_ci95'][0]:.1%}, "
                  f"{rm['true_ci95'][1]:.1%}].", ""]
    lines += ["## Training", ""]
    for name in ("sft", "reward", "dpo"):
        s = fig["summaries"][name]
        lines.append(f"- {name}: {s.get('step', '?')} steps, {s.get('tokens', 0):,} tokens; held out: "
                     + (", ".join(_metric_lines(s)) or "none"))
    lines.append("")
    for name, caption in (("sft", "SFT loss"), ("reward", "reward model loss"), ("dpo", "DPO loss")):
        lines += _figure(out, f"{name}/plots/loss.png", caption)
    lines += ["## Samples", ""]
    lines += _sample_lines(results, cfg.eval.samples_per_task)
    return "\n".join(lines) + "\n"


def _sample_lines(results: dict[str, dict], per_task: int) -> list[str]:
    """The first prompts of each task with every model's answer (evaluate_tasks keeps the same ones)."""
    answers = {m: {s["prompt"]: s for s in results[m]["samples"]} for m in MODELS}
    lines, shown = [], {}
    for s in results["base"]["samples"]:
        if shown.get(s["task"], 0) >= per_task:
            continue
        shown[s["task"]] = shown.get(s["task"], 0) + 1
        lines += [f"**{s['task']}**: `{s['prompt']}` (answer `{s['answer']}`)", ""]
        for m in MODELS:
            got = answers[m].get(s["prompt"])
            if got is not None:
                mark = "right" if got["correct"] else "wrong"
                lines.append(f"- {m}: `{got['response']!r}` ({mark})")
        lines.append("")
    return lines
