"""`llmlab experiment rlhf`: reward hacking against a length-biased reward model, and what a KL term does.

    llmlab experiment rlhf --out runs/rlhf                 # reuses runs/chat's SFT model when it is there
    llmlab experiment rlhf --out runs/rlhf --smoke         # the seconds-long size the tests run

Stages, each reusing its output when it is complete and made with the same settings (a stage's stamp
OUT/NAME.settings.json chains the digests of its settings and of every earlier stage's; an interrupted
stage starts over, and each measured checkpoint is cached in OUT/eval/):
  1. the SFT model: chat_run's (a `llmlab speedrun --preset cpu-chat` run: sft/summary.json, tasks/), else
     the cpu-chat preset's base, task-data and SFT stages run here into OUT/chat/
  2. preferences: the SFT model's own samples on train prompts, labelled by the `length` rater (it prefers
     the longer answer, whatever it says)                                         -> OUT/preferences/
  3. a reward model on the SFT backbone (Bradley-Terry)                          -> OUT/reward/
  4-7. four arms from the same SFT model, each for the same number of optimizer steps; the RL arms also
     sample the same number of responses (rollouts * responses_per_rollout):
       ppo_beta0  PPO against the reward model, beta = 0 (no KL term)            -> OUT/ppo_beta0/
       ppo_kl     PPO against the reward model, beta = kl_coef                   -> OUT/ppo_kl/
       dpo        DPO on the same preference pairs (no rollouts)                 -> OUT/dpo/
       grpo       GRPO rewarded by the task graders (the true reward)            -> OUT/grpo/
  8. every arm's checkpoints (eval_points of them, plus the SFT start) measured on the same held-out test
     prompts, then the report                                        -> OUT/eval/, report.md/json, rlhf.png

Measured per checkpoint, on eval_per_task test prompts per task: the reward model's score, the KL to the
SFT model (k1 summed over the response, whose mean over responses sampled from the policy estimates
KL(pi || pi_SFT)) and the response length, all on responses sampled at temperature 1 with a fixed seed;
and the true accuracy of greedy answers (the task graders). Accuracy comes with a 95% Wilson interval,
means with a 95% normal interval (1.96 standard errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.align.dpo import DPOConfig, run_dpo
from llmlab.align.grpo import GRPOConfig, GRPORunConfig, run_grpo
from llmlab.align.ppo import PPOConfig, PPORunConfig, PromptDataConfig, load_frozen, pad_id_of, run_ppo
from llmlab.align.preferences import make_preferences, write_jsonl
from llmlab.align.reward import RewardConfig, run_reward
from llmlab.align.rollout import Rollout, grader_reward, last_token_scores, rollout, sample_responses
from llmlab.align.sft import run_sft
from llmlab.config import NonNegativeInt, PositiveFloat, PositiveInt, load_config
from llmlab.data.tasks import mixture, parse_difficulty, read_prompt_set, write_task_data
from llmlab.device import resolve_device
from llmlab.errors import ConfigError, DataError
from llmlab.evals.tasks import wilson_interval
from llmlab.fsutil import check_output, remove_path, write_bytes_atomic, write_text_atomic
from llmlab.model import Transformer
from llmlab.speedrun import run_speedrun
from llmlab.speedrun_chat import load_chat_preset
from llmlab.tokenizer import Tokenizer
from llmlab.train.optim import OptimConfig
from llmlab.train.trainer import TrainConfig

ARMS = ("ppo_beta0", "ppo_kl", "dpo", "grpo")
Z95 = 1.959963984540054


@dataclass
class RLHFConfig:
    chat_run: str = "runs/chat"        # a cpu-chat speedrun whose SFT model and tasks/ are reused when there
    base_checkpoint: str = ""          # else: the base model the SFT stages start from ("": cpu-chat's rule)
    chat_overrides: list[str] = field(default_factory=list)  # cpu-chat preset overrides for those stages
    device: str = "cpu"
    seed: NonNegativeInt = 0
    # preferences (length rater)
    prompts_per_task: PositiveInt = 150
    samples: PositiveInt = 4
    noise: float = 0.1
    pref_max_new_tokens: PositiveInt = 24
    heldout_fraction: float = 0.15
    # reward model
    reward_steps: PositiveInt = 100
    reward_lr: PositiveFloat = 3e-4
    pair_batch_size: PositiveInt = 16
    # the arms: the same optimizer steps (rollouts * epochs) and the same sampled responses for PPO and GRPO
    rollouts: PositiveInt = 64
    responses_per_rollout: PositiveInt = 16  # PPO: prompts per rollout; GRPO: prompts * group_size
    group_size: PositiveInt = 4              # GRPO's G
    epochs: PositiveInt = 2                  # passes over each rollout batch (PPO epochs, GRPO iterations)
    response_length: PositiveInt = 24
    lr: PositiveFloat = 3e-5                 # every arm's learning rate
    kl_coef: float = 0.1                     # the KL arm's beta (the other PPO arm has 0)
    grpo_beta: float = 0.04                  # GRPO's k3 weight (TRL's default)
    dpo_beta: PositiveFloat = 0.1
    max_minutes: PositiveFloat = 8.0         # safety cap per arm (a capped arm reports the steps it made)
    run_plots: bool = True                   # each run's own PNG plots (loss, rl.png) beside its checkpoints
    # evaluation
    eval_points: PositiveInt = 8             # checkpoints measured per arm, evenly spaced, plus the start
    eval_per_task: PositiveInt = 40          # held-out test prompts per task
    eval_batch_size: PositiveInt = 64


SMOKE = ["prompts_per_task=4", "samples=3", "pref_max_new_tokens=6", "heldout_fraction=0.3",
         "reward_steps=2", "pair_batch_size=4", "rollouts=2", "responses_per_rollout=4", "group_size=2",
         "epochs=1", "response_length=6", "eval_points=1", "run_plots=false", "eval_per_task=3",
         "eval_batch_size=16",
         "max_minutes=2.0",
         "chat_overrides=[\"tasks.tasks=['lookup', 'sort']\", \"tasks.difficulty={lookup = 2, sort = 3}\", "
         "\"tasks.train_per_task=40\", \"tasks.test_per_task=6\", \"sft.optim.max_steps=3\", "
         "\"sft.optim.warmup_steps=1\", \"sft.data.batch_size=4\", \"sft.data.block_size=64\", "
         "\"sft.train.eval_every=0\", \"sft.train.plot=false\"]"]


def load_rlhf_config(overrides: list[str] | tuple = (), smoke: bool = False) -> RLHFConfig:
    cfg = load_config(RLHFConfig, None, [*(SMOKE if smoke else []), *overrides])
    if cfg.responses_per_rollout % cfg.group_size:
        raise ConfigError(f"responses_per_rollout={cfg.responses_per_rollout} must be a multiple of "
                        f"group_size={cfg.group_size} (GRPO samples group_size answers per prompt); fix one")
    chat_config(cfg)  # the SFT stages' settings (and a given base checkpoint) are checked before any work
    return cfg


def chat_config(cfg: RLHFConfig):
    """The cpu-chat preset with chat_overrides and base_checkpoint: the settings of the SFT stages here."""
    base = [f"base.checkpoint='{cfg.base_checkpoint}'"] if cfg.base_checkpoint else []
    return load_chat_preset("cpu-chat", [*cfg.chat_overrides, *base])


def steps_per_arm(cfg: RLHFConfig) -> int:
    return cfg.rollouts * cfg.epochs


# ----- stage bookkeeping -----
class Stages:
    """Runs each stage once per settings (the module docstring's chain of stamps) and times it."""

    count = 8

    def __init__(self, out: Path, log):
        self.out, self.log = out, log
        self.seconds: dict[str, float | None] = {}
        self.chain = ""
        self.chains: dict[str, str] = {}

    def link(self, name: str, settings) -> str:
        text = json.dumps(settings, sort_keys=True, default=str)
        self.chain = hashlib.sha256(f"{self.chain}\n{text}".encode()).hexdigest()
        self.chains[name] = self.chain
        return self.chain

    def run(self, index: int, name: str, settings, done: Path, work, describe: str):
        stamp = self.out / f"{name}.settings.json"
        chain = self.link(name, settings)
        if done.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("chain") == chain:
            self.log(f"[{index}/{self.count}] {name}: reusing {done}")
            self.seconds[name] = None
            return json.loads(done.read_text())
        self.log(f"[{index}/{self.count}] {name}: {describe}")
        remove_path(stamp)
        t0 = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - t0
        write_text_atomic(stamp, json.dumps({"chain": chain, "settings": settings}, indent=2, default=str))
        return result


# ----- stage 1: the SFT model -----
def _stage_sft(cfg: RLHFConfig, out: Path, stages: Stages) -> tuple[str, Path]:
    """(SFT checkpoint, tasks directory): the chat run's, else made here with the cpu-chat preset's stages."""
    chat = Path(cfg.chat_run)
    summary = chat / "sft" / "summary.json"
    if summary.is_file() and (chat / "tasks" / "tasks.json").is_file():
        ckpt = json.loads(summary.read_text())["checkpoint"]
        if (Path(ckpt) / "model.safetensors").is_file():
            stages.link("sft", {"checkpoint": ckpt, "tasks": str(chat / "tasks")})
            stages.log(f"[1/{stages.count}] sft: reusing the {chat} run's {ckpt}")
            stages.seconds["sft"] = None
            return ckpt, chat / "tasks"
    chat_cfg = chat_config(cfg)
    own = out / "chat"

    def work() -> dict:
        base = _base_checkpoint(chat_cfg, own, stages)
        t = chat_cfg.tasks
        remove_path(own / "tasks")
        write_task_data(own / "tasks", t.tasks, t.train_per_task, t.test_per_task,
                        parse_difficulty(t.difficulty), t.seed)
        sft = dataclasses.replace(
            chat_cfg.sft, checkpoint=base,
            data=dataclasses.replace(chat_cfg.sft.data, train=str(own / "tasks" / "train.jsonl")),
            train=dataclasses.replace(chat_cfg.sft.train, out_dir=str(own), run_name="sft", overwrite=True))
        return run_sft(sft, say=stages.log)

    settings = {"chat": dataclasses.asdict(chat_cfg)}
    result = stages.run(1, "sft", settings, own / "sft" / "summary.json", work,
                        f"no SFT model in {chat}: running the cpu-chat preset's base, tasks and SFT stages "
                        f"into {own}")
    return result["checkpoint"], own / "tasks"


def _base_checkpoint(chat_cfg, own: Path, stages: Stages) -> str:
    b = chat_cfg.base
    if b.checkpoint:
        return b.checkpoint
    demo = Path(b.demo_run) / "report.json"
    if demo.is_file():
        ckpt = json.loads(demo.read_text()).get("checkpoint", "")
        if ckpt and (Path(ckpt) / "model.safetensors").is_file():
            return ckpt
    stages.log(f"  pretraining a base model with the {b.preset} speedrun into {own / 'base'}")
    return run_speedrun(b.preset, own / "base", b.overrides)["checkpoint"]


# ----- stage 2: preferences from the length rater -----
def _stage_preferences(cfg: RLHFConfig, out: Path, sft: str, tasks: Path, stages: Stages) -> dict:
    directory = out / "preferences"
    settings = {k: getattr(cfg, k) for k in ("prompts_per_task", "samples", "noise", "pref_max_new_tokens",
                                             "heldout_fraction", "seed", "eval_batch_size")}

    def work() -> dict:
        meta = json.loads((tasks / "tasks.json").read_text())
        prompts = mixture(meta["tasks"], "train", cfg.prompts_per_task, meta["difficulty"], cfg.seed + 1)
        model, tok = _load_policy(sft, cfg)
        records, stats = make_preferences(model, tok, prompts, "length", cfg.noise, cfg.samples, 1.0,
                                          cfg.pref_max_new_tokens, cfg.eval_batch_size, cfg.seed)
        order = list(range(len(records)))
        random.Random(f"llmlab-rlhf-heldout:{cfg.seed}").shuffle(order)
        held = set(order[:max(1, round(cfg.heldout_fraction * len(records)))])
        train = [r for i, r in enumerate(records) if i not in held]
        heldout = [r for i, r in enumerate(records) if i in held]
        if not train:
            raise DataError(f"the SFT model's samples gave only {len(records)} preference pair(s) under the "
                            "length rater; raise prompts_per_task or samples")
        write_jsonl(directory / "train.jsonl", train)
        write_jsonl(directory / "heldout.jsonl", heldout)
        stats.update(train_pairs=len(train), heldout_pairs=len(heldout),
                     chosen_longer=sum(len(_text(r["chosen"])) > len(_text(r["rejected"])) for r in records),
                     chosen_correct=sum(bool(r["chosen_correct"]) for r in records),
                     rejected_correct=sum(bool(r["rejected_correct"]) for r in records))
        write_text_atomic(directory / "stats.json", json.dumps(stats, indent=2) + "\n")
        return stats

    return stages.run(2, "preferences", settings, directory / "stats.json", work,
                      f"{cfg.samples} samples for each of {cfg.prompts_per_task} train prompts per task, "
                      f"labelled by the length rater (noise {cfg.noise})")


def _text(messages: list[dict]) -> str:
    return messages[0]["content"].strip()


# ----- stages 3-7: the reward model and the arms -----
def _train(cfg: RLHFConfig, out: Path, name: str, ckpt_every: int) -> TrainConfig:
    return TrainConfig(device=cfg.device, seed=cfg.seed, out_dir=str(out), run_name=name, overwrite=True,
                       progress=False, plot=cfg.run_plots, eval_every=0, ckpt_every=ckpt_every, keep_last=0,
                       keep_best=False, max_minutes=cfg.max_minutes, dtype="fp32")


def _optim(lr: float, steps: int, warmup: int = 0) -> OptimConfig:
    return OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=warmup, max_steps=steps, min_lr_ratio=1.0)


def _ckpt_every(cfg: RLHFConfig) -> int:
    return max(1, steps_per_arm(cfg) // cfg.eval_points)


def _pairs(data, prefs: Path, cfg: RLHFConfig):
    return dataclasses.replace(data, train=str(prefs / "train.jsonl"), val=str(prefs / "heldout.jsonl"),
                               batch_size=cfg.pair_batch_size)


def _stage_reward(cfg: RLHFConfig, out: Path, sft: str, stages: Stages) -> dict:
    prefs = out / "preferences"
    base = RewardConfig()
    rm = dataclasses.replace(
        base, checkpoint=sft, optim=_optim(cfg.reward_lr, cfg.reward_steps, min(10, cfg.reward_steps // 5)),
        data=_pairs(base.data, prefs, cfg), train=_train(cfg, out, "reward", 0))
    return stages.run(3, "reward", dataclasses.asdict(rm), out / "reward" / "summary.json",
                      lambda: run_reward(rm), f"a reward model on the SFT backbone, {cfg.reward_steps} steps")


def _ppo_config(cfg: RLHFConfig, out: Path, name: str, sft: str, rm: str, tasks: Path,
                beta: float) -> PPORunConfig:
    ppo = PPOConfig(rollout_batch_size=cfg.responses_per_rollout, num_ppo_epochs=cfg.epochs,
                    num_mini_batches=1, response_length=cfg.response_length, kl_coef=beta, seed=cfg.seed)
    return PPORunConfig(checkpoint=sft, reward_model=rm,
                        data=PromptDataConfig(prompts=str(tasks / "train_prompts.jsonl")), ppo=ppo,
                        optim=_optim(cfg.lr, steps_per_arm(cfg)),
                        train=_train(cfg, out, name, _ckpt_every(cfg)))


def _grpo_config(cfg: RLHFConfig, out: Path, sft: str, tasks: Path) -> GRPORunConfig:
    grpo = GRPOConfig(prompts_per_rollout=cfg.responses_per_rollout // cfg.group_size,
                      num_generations=cfg.group_size, num_iterations=cfg.epochs,
                      max_completion_length=cfg.response_length, beta=cfg.grpo_beta, seed=cfg.seed)
    return GRPORunConfig(checkpoint=sft, reward="grader",
                         data=PromptDataConfig(prompts=str(tasks / "train_prompts.jsonl")), grpo=grpo,
                         optim=_optim(cfg.lr, steps_per_arm(cfg)),
                         train=_train(cfg, out, "grpo", _ckpt_every(cfg)))


def _dpo_config(cfg: RLHFConfig, out: Path, sft: str) -> DPOConfig:
    prefs, base = out / "preferences", DPOConfig()
    return dataclasses.replace(
        base, checkpoint=sft, dpo=dataclasses.replace(base.dpo, beta=cfg.dpo_beta),
        data=_pairs(base.data, prefs, cfg), optim=_optim(cfg.lr, steps_per_arm(cfg)),
        train=_train(cfg, out, "dpo", _ckpt_every(cfg)))


def _stage_arms(cfg: RLHFConfig, out: Path, sft: str, rm: str, tasks: Path, stages: Stages) -> dict:
    runs = {"ppo_beta0": (_ppo_config(cfg, out, "ppo_beta0", sft, rm, tasks, 0.0), run_ppo,
                          "PPO against the reward model, beta 0"),
            "ppo_kl": (_ppo_config(cfg, out, "ppo_kl", sft, rm, tasks, cfg.kl_coef), run_ppo,
                       f"PPO against the reward model, beta {cfg.kl_coef}"),
            "dpo": (_dpo_config(cfg, out, sft), run_dpo, f"DPO on the same pairs, beta {cfg.dpo_beta}"),
            "grpo": (_grpo_config(cfg, out, sft, tasks), run_grpo,
                     f"GRPO on the graded (true) reward, G {cfg.group_size}, beta {cfg.grpo_beta}")}
    summaries = {}
    stages_chain = stages.chain
    for i, (name, (run_cfg, fn, describe)) in enumerate(runs.items(), start=4):
        stages.chain = stages_chain  # arms are siblings: each depends on stages 1-3, not on the others
        summaries[name] = stages.run(i, name, dataclasses.asdict(run_cfg), out / name / "summary.json",
                                     lambda c=run_cfg, f=fn: f(c),
                                     f"{describe}, {steps_per_arm(cfg)} steps")
    return summaries


# ----- stage 8: measuring every checkpoint -----
def _load_policy(path: str, cfg: RLHFConfig):
    model = Transformer.load(path, device=resolve_device(cfg.device), dtype="fp32").eval()
    return model, Tokenizer.load(Path(path) / "tokenizer")


def eval_prompts(cfg: RLHFConfig, tok, tasks: Path) -> tuple[list, list[list[int]]]:
    """The first eval_per_task test prompts of each task, and their chat-template encodings."""
    seen: dict[str, int] = {}
    examples = []
    for ex in read_prompt_set(tasks / "test_prompts.jsonl"):
        if seen.get(ex.task, 0) < cfg.eval_per_task:
            seen[ex.task] = seen.get(ex.task, 0) + 1
            examples.append(ex)
    prompts = [tok.apply_chat_template(ex.prompt_messages(), add_generation_prompt=True)[0]
               for ex in examples]
    return examples, prompts


@torch.no_grad()
def measure(policy, reference, reward_model, tok, examples, prompts, cfg: RLHFConfig) -> dict:
    """Per held-out prompt: RM score, k1 KL to the reference and length of a sampled response; greedy
    correctness (module docstring)."""
    template = tok.chat_template
    stop, pad = template.stop_ids, pad_id_of(template)
    grader = grader_reward(tok, examples)
    per = {"score": [], "kl": [], "length": [], "correct": [], "greedy_length": [], "greedy_score": []}
    for start in range(0, len(prompts), cfg.eval_batch_size):
        chunk = prompts[start:start + cfg.eval_batch_size]
        ro = rollout(policy, chunk, stop_ids=stop, pad_id=pad, max_new_tokens=cfg.response_length,
                     temperature=1.0, seed=cfg.seed * 7919 + start, reference=reference,
                     reward_model=reward_model)
        per["score"] += ro.scores.tolist()
        per["kl"] += ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(dim=1).tolist()
        per["length"] += ro.mask.sum(dim=1).tolist()
        greedy = sample_responses(policy, chunk, stop_ids=stop, pad_id=pad,
                                  max_new_tokens=cfg.response_length, temperature=0)
        g = Rollout(**greedy, logprobs=torch.zeros_like(greedy["mask"]))
        per["correct"] += [bool(x) for x in grader(list(range(start, start + len(chunk))), g).tolist()]
        per["greedy_length"] += g.mask.sum(dim=1).tolist()
        per["greedy_score"] += last_token_scores(reward_model, g).tolist()
    return summarize(per)


def summarize(per: dict[str, list]) -> dict:
    """Means with 95% intervals (normal for means, Wilson for accuracy), and the per-prompt values."""
    n = len(per["correct"])
    k = sum(per["correct"])
    stats = {"n": n, "accuracy": k / n, "accuracy_ci95": list(wilson_interval(k, n))}
    for key in ("score", "kl", "length", "greedy_length", "greedy_score"):
        stats[key], stats[f"{key}_ci95"] = mean_interval(per[key])
    return {**stats, "per_prompt": per}


def mean_interval(values: list[float]) -> tuple[float, list[float]]:
    """(mean, [lo, hi]): the 95% normal interval, mean +- 1.96 standard errors."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.split("-")[1]), p) for p in run_dir.glob("ckpt-*")
                  if (p / "model.safetensors").is_file())


def _stage_eval(cfg: RLHFConfig, out: Path, sft: str, rm: str, tasks: Path, stages: Stages) -> dict:
    """{arm: [{"step", ...measure()}]}, each point cached in OUT/eval/ under its stage's chain and the
    measuring settings."""
    stages.log(f"[8/{stages.count}] eval: {cfg.eval_per_task} held-out prompts per task at every arm's "
               "checkpoints, and the report")
    t0 = time.perf_counter()
    reference, tok = _load_policy(sft, cfg)
    reward_model = load_frozen(rm, resolve_device(cfg.device))
    examples, prompts = eval_prompts(cfg, tok, tasks)

    settings = json.dumps({k: getattr(cfg, k) for k in ("eval_per_task", "response_length", "seed",
                                                         "eval_batch_size")}, sort_keys=True)

    def cached(path: Path, chain: str, model_path: str) -> dict:
        chain = hashlib.sha256(f"{chain}\n{settings}".encode()).hexdigest()  # the measuring settings too
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("chain") == chain:
                return record["result"]
        policy = reference if model_path == sft else _load_policy(model_path, cfg)[0]
        result = measure(policy, reference, reward_model, tok, examples, prompts, cfg)
        write_text_atomic(path, json.dumps({"chain": chain, "result": result}) + "\n")
        return result

    start = {"step": 0, **cached(out / "eval" / "sft.json", stages.chains["reward"], sft)}
    curves = {}
    for arm in ARMS:
        points = [start]
        for step, path in checkpoints(out / arm):
            points.append({"step": step, **cached(out / "eval" / arm / f"step-{step:06d}.json",
                                                 stages.chains[arm], str(path))})
        curves[arm] = points
    stages.seconds["eval"] = time.perf_counter() - t0
    return curves


# ----- the run -----
def run_rlhf(out: str | Path, overrides: list[str] | tuple = (), smoke: bool = False, log=print) -> dict:
    """Run (or resume) the experiment into OUT; return report.json's content."""
    cfg = load_rlhf_config(overrides, smoke)
    out = Path(out)
    check_output(out, inputs=[cfg.base_checkpoint or None], overwrite=True, into=True, kept=True,
                 what="experiment directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = Stages(out, log)
    sft, tasks = _stage_sft(cfg, out, stages)
    prefs = _stage_preferences(cfg, out, sft, tasks, stages)
    reward = _stage_reward(cfg, out, sft, stages)
    arms = _stage_arms(cfg, out, sft, reward["checkpoint"], tasks, stages)
    curves = _stage_eval(cfg, out, sft, reward["checkpoint"], tasks, stages)
    report = {"config": dataclasses.asdict(cfg), "sft_checkpoint": sft, "tasks": str(tasks),
              "preferences": prefs, "reward_model": _reward_figures(reward),
              "arms": {a: _arm_figures(cfg, a, arms[a], curves[a]) for a in ARMS},
              "seconds": {**stages.seconds, "total": time.perf_counter() - started}}
    start = curves["ppo_beta0"][0]["per_prompt"]
    report["findings"] = {**findings(report),
                          "sft_score_length_r": correlation(start["score"], start["length"])}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_curves(report, out / "rlhf.png")
    write_text_atomic(out / "report.md", render_report(report))
    log(f"[done] {out / 'report.md'}")
    return report


def _reward_figures(summary: dict) -> dict:
    return {"checkpoint": summary["checkpoint"], "steps": summary.get("step"),
            **{k: summary[k] for k in ("val_loss", "val_accuracy", "val_margin") if k in summary}}


def _arm_figures(cfg: RLHFConfig, arm: str, summary: dict, points: list[dict]) -> dict:
    curve = [{k: v for k, v in p.items() if k != "per_prompt"} for p in points]
    responses = 0 if arm == "dpo" else summary.get("step", 0) // cfg.epochs * cfg.responses_per_rollout
    return {"steps": summary.get("step"), "planned_steps": steps_per_arm(cfg), "sampled_responses": responses,
            "curve": curve, "final": curve[-1]}


def findings(r: dict) -> dict:
    """The expectation checked against what happened: changes from the SFT start to each arm's end, and
    whether each moved beyond both intervals."""
    out = {}
    for arm, a in r["arms"].items():
        first, last = a["curve"][0], a["curve"][-1]
        out[arm] = {key: {"change": last[key] - first[key],
                          "separated": _separated(first[f"{key}_ci95"], last[f"{key}_ci95"])}
                    for key in ("score", "accuracy", "kl", "length")}
    b0 = out["ppo_beta0"]
    out["hacking_seen"] = (b0["score"]["change"] > 0 and b0["accuracy"]["change"] < 0
                           and b0["length"]["change"] > 0)
    out["kl_holds"] = out["ppo_kl"]["accuracy"]["change"] >= 0 or not out["ppo_kl"]["accuracy"]["separated"]
    return out


def correlation(x: list[float], y: list[float]) -> float | None:
    """Pearson's r (None when either side is constant)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _separated(a: list[float], b: list[float]) -> bool:
    return a[1] < b[0] or b[1] < a[0]


# ----- plot and report -----
PANELS = (("score", "reward-model score (sampled)"), ("accuracy", "true accuracy (greedy, graded)"),
          ("kl", "KL to SFT (per response)"), ("length", "response length (tokens, sampled)"))


def plot_curves(r: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    for i, (key, title) in enumerate(PANELS, start=1):
        ax = fig.add_subplot(2, 2, i)
        for arm, a in r["arms"].items():
            steps = [p["step"] for p in a["curve"]]
            ax.plot(steps, [p[key] for p in a["curve"]], marker="o", label=arm)
            lo, hi = zip(*(p[f"{key}_ci95"] for p in a["curve"]), strict=True)
            ax.fill_between(steps, lo, hi, alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3)
        if i == 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(path, buf.getvalue())


def _ci(p: dict, key: str, fmt: str) -> str:
    lo, hi = p[f"{key}_ci95"]
    return f"{p[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _seconds(v) -> str:
    return "reused" if v is None else f"{v:.0f} s"


def render_report(r: dict) -> str:
    c, p, rm = r["config"], r["preferences"], r["reward_model"]
    start = r["arms"]["ppo_beta0"]["curve"][0]
    n = start["n"]
    lines = [
        "# Reward hacking: PPO with and without the KL term, DPO and GRPO", "",
        f"All arms start from the SFT model `{r['sft_checkpoint']}` and take the same number of optimizer "
        f"steps ({c['rollouts']} rollouts x {c['epochs']} epochs); PPO and GRPO sample "
        f"{c['responses_per_rollout']} responses per rollout (GRPO: groups of {c['group_size']}). Seed "
        f"{c['seed']}.", "",
        "## Expectation", "",
        "The reward model learns the `length` rater's bias. PPO with beta = 0 maximises its score with "
        "nothing holding it near the SFT model, so the score should climb while the true accuracy falls and "
        "answers lengthen (reward hacking). With the KL term (beta = "
        f"{c['kl_coef']}) the policy stays near the SFT model and true accuracy should hold or rise. DPO "
        "learns the same biased pairs offline; GRPO optimises the true (graded) reward.", "",
        "## Preferences and the reward model", "",
        f"The SFT model answered {p['prompts']} train prompts {c['samples']} times each "
        f"({p['sample_accuracy']:.1%} of the answers correct). The length rater ordered {p['pairs']} pairs "
        f"(noise {p['noise']}: {p['flipped']} flipped); the chosen answer is the longer one in "
        f"{p['chosen_longer']} and the correct one in {p['chosen_correct']} (rejected correct: "
        f"{p['rejected_correct']}). {p['train_pairs']} pairs train the reward model and DPO, "
        f"{p['heldout_pairs']} are held out.",
        "",
        "Reward model (" + f"{rm.get('steps')} steps), held-out: "
        + (", ".join(f"{k} {v:.3f}" for k, v in rm.items() if k.startswith("val_")) or "none") + ".", "",
        f"## Over training ({n} held-out test prompts)", "", "![curves](rlhf.png)", "",
        "| arm | step | RM score | true accuracy | KL to SFT | length |", "|---|---|---|---|---|---|"]
    for arm, a in r["arms"].items():
        for pt in a["curve"]:
            lines.append(f"| {arm} | {pt['step']} | {pt['score']:.3f} | {pt['accuracy']:.1%} | "
                         f"{pt['kl']:.2f} | {pt['length']:.1f} |")
    lines += ["", "## Final (95% intervals: Wilson for accuracy, normal for means)", "",
              "| arm | steps | sampled responses | RM score | true accuracy | KL to SFT | length |",
              "|---|---|---|---|---|---|---|",
              f"| SFT (start) | 0 | 0 | {_ci(start, 'score', '.3f')} | {_ci(start, 'accuracy', '.1%')} | "
              f"{_ci(start, 'kl', '.2f')} | {_ci(start, 'length', '.1f')} |"]
    for arm, a in r["arms"].items():
        fin = a["final"]
        lines.append(f"| {arm} | {a['steps']} | {a['sampled_responses']} | {_ci(fin, 'score', '.3f')} | "
                     f"{_ci(fin, 'accuracy', '.1%')} | {_ci(fin, 'kl', '.2f')} | "
                     f"{_ci(fin, 'length', '.1f')} |")
    lines += ["", "## What happened", ""] + _what_happened(r) + [
        "", "| stage | time |", "|---|---|", *(f"| {k} | {_seconds(v)} |" for k, v in r["seconds"].items()),
        ""]
    return "\n".join(lines)


def _change(f: dict, key: str, fmt: str) -> str:
    d = f[key]
    return f"{d['change']:+{fmt}}" + ("" if d["separated"] else " (within the intervals)")


def _what_happened(r: dict) -> list[str]:
    f = r["findings"]
    lines = []
    for arm in ARMS:
        a = f[arm]
        lines.append(f"- {arm}: RM score {_change(a, 'score', '.3f')}, true accuracy "
                     f"{_change(a, 'accuracy', '.1%')}, KL {_change(a, 'kl', '.2f')}, length "
                     f"{_change(a, 'length', '.1f')} tokens.")
    lines.append("")
    if f["hacking_seen"]:
        lines.append("With beta = 0 the reward model's score rose while true accuracy fell and answers "
                     "lengthened: the expected reward hacking (see the intervals above for how clear it is).")
    else:
        lines += ["The expected reward hacking did not appear as stated (RM score up, accuracy down, longer "
                  "answers all at once at beta = 0). Why, from the measurements:"] + _why_not(r)
    lines.append("")
    change = f"{f['ppo_kl']['accuracy']['change']:+.1%}"
    held = "no fall beyond the 95% intervals" if f["kl_holds"] else "a fall beyond the 95% intervals"
    lines.append(f"With the KL term (beta = {r['config']['kl_coef']}) true accuracy changed by {change}: "
                 f"{held}.")
    corr = f.get("sft_score_length_r")
    if corr is not None:
        lines += ["", f"On the SFT model's sampled answers to the held-out prompts the reward model's score "
                      f"correlates with answer length at r = {corr:.2f}: how much of the length bias the "
                      "policy could find to exploit."]
    return lines


def _why_not(r: dict) -> list[str]:
    b0 = r["arms"]["ppo_beta0"]
    first, last = b0["curve"][0], b0["final"]
    p, c = r["preferences"], r["config"]
    why = []
    if last["kl"] < 1.0:
        why.append(f"- the beta = 0 policy moved little: KL to SFT {last['kl']:.2f} nats per response after "
                   f"{b0['steps']} steps at lr {c['lr']}")
    if first["accuracy"] < 0.05:
        why.append(f"- the SFT model starts at {first['accuracy']:.1%} accuracy: there is little to lose")
    if p["pairs"] and p["chosen_longer"] / p["pairs"] < 0.8:
        why.append(f"- only {p['chosen_longer']}/{p['pairs']} chosen answers are the longer one")
    val = r["reward_model"].get("val_accuracy")
    if val is not None and val < 0.7:
        why.append(f"- the reward model agrees with held-out length labels on only {val:.1%}")
    if last["score"] <= first["score"]:
        why.append(f"- the RM score did not rise ({first['score']:.3f} -> {last['score']:.3f})")
    if last["length"] <= first["length"]:
        why.append(f"- answers did not lengthen ({first['length']:.1f} -> {last['length']:.1f} tokens; "
                   f"the limit is {c['response_length']})")
    corr = r["findings"].get("sft_score_length_r")
    if corr is not None and corr <= 0.1:
        why.append(f"- on the SFT model's own answers the reward model's score does not grow with length "
                   f"(r = {corr:.2f}), so lengthening is not what it rewards there")
    return why or ["- none of the usual causes shows; the curves above are the evidence"]
