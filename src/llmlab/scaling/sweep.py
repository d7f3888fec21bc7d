"""Scaling sweeps: many real pretraining runs of one model family, recorded as (N, D, C, loss) rows.

    llmlab scaling sweep --config sweep.toml --out runs/sweep pretrain.data.shards=data/stdlib/shards
    llmlab scaling sweep --out runs/sweep --dry-run      # list the points with N, D, C and stop

The family is scaled by one dial, the depth d (as in nanochat): n_layer = d, d_model = aspect * d, n_head =
d_model / head_dim; everything else (flavour, block size, vocabulary, optimizer, batch) comes from the
`pretrain` section. Kinds of point:
  - isoflop: for each budget C in `budgets` and each depth, the model trains for the tokens its budget
    allows, D = C / (training FLOPs per token, Chinchilla's per-layer count), rounded to whole steps;
    Hoffmann et al. (2022) approach 2 fits a parabola through each budget's losses.
  - size (with size_tokens > 0): every depth trained on size_tokens tokens (Kaplan et al. 2020's L(N)).
  - data (with data_depth > 0): the data_depth model trained on each of data_tokens (Kaplan's L(D)).
Every point is one `run_pretrain` whose cosine schedule ends where the run ends (optim.max_steps = its
steps, warmup a fraction of them), evaluated once at the end on the whole val split (so the loss is the
whole-split figure, val_coverage 1), checkpointed only at the end. Points whose budget gives fewer than
`min_steps` steps are left out: a run that short measures the warmup, not the model.

Resuming and budgets. Each finished point leaves OUT/points/NAME/result.json; a rerun of the same sweep
skips those, and a point stopped part way (killed, or by the time budget) continues from its checkpoint
(run_pretrain with resume="auto"). `max_minutes` caps the whole sweep: each point gets the time left as its
train.max_minutes, and no point starts once it is spent; rerun to finish. OUT/sweep.json holds the settings
that decide the points, and a rerun with different ones is refused. OUT/results.csv is rewritten after every
point; OUT/curves.csv holds every finished point's training-loss curve (for Chinchilla's approach 1).

Parallel points. With jobs > 1 each point runs in its own process (`python -m llmlab.scaling.sweep
POINT.toml`) with train.threads = threads, so `jobs` x `threads` should not exceed the cores; jobs = 0 picks
cores // threads on CPU and 1 on a GPU. Under torchrun every rank runs the same sweep, one point at a time,
each point a DDP (or FSDP) run across the ranks, and only rank 0 writes the sweep's files (README).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.config import NonNegativeInt, PositiveFloat, PositiveInt, check_config, load_config, to_toml
from llmlab.errors import ConfigError
from llmlab.fsutil import check_output, write_text_atomic
from llmlab.model import ModelConfig
from llmlab.scaling.flops import param_counts, train_flops_per_token
from llmlab.train.metrics import read_metrics
from llmlab.train.pretrain import PretrainConfig, run_pretrain

RESULT_COLUMNS = ["name", "kind", "depth", "budget", "N", "N_nonembed", "D", "C", "C_6ND", "loss",
                  "val_coverage", "epochs", "steps", "wall_s"]
CURVE_COLUMNS = ["name", "N", "D", "C", "loss"]
WHOLE_SPLIT = 10**9  # train.eval_batches that covers any val split: the eval reads all of it


def _default_pretrain() -> PretrainConfig:
    cfg = PretrainConfig()
    model = dataclasses.replace(cfg.model, block_size=128, d_ff=None)
    data = dataclasses.replace(cfg.data, batch_size=16)
    optim = dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=0)
    train = dataclasses.replace(cfg.train, device="cpu", run_name="point")
    return dataclasses.replace(cfg, model=model, data=data, optim=optim, train=train)


@dataclass
class SweepConfig:
    budgets: list[PositiveFloat] = field(default_factory=lambda: [3e11, 1e12, 3e12])  # FLOPs per profile
    depths: list[PositiveInt] = field(default_factory=lambda: [1, 2, 3, 4, 5])        # the dial
    aspect: PositiveInt = 32             # d_model = aspect * depth
    head_dim: PositiveInt = 32           # n_head = d_model / head_dim
    size_tokens: NonNegativeInt = 0      # > 0: size-only sweep, every depth on this many tokens
    data_depth: NonNegativeInt = 0       # > 0: data-only sweep of this depth ...
    data_tokens: list[PositiveInt] = field(default_factory=list)  # ... on each of these token counts
    warmup_fraction: float = 0.1         # warmup steps = ceil(fraction x steps)
    min_steps: PositiveInt = 20          # points with fewer steps are left out
    jobs: NonNegativeInt = 0             # points at once (0: cores // threads on CPU, 1 on GPU)
    threads: PositiveInt = 1             # torch threads per point process
    max_minutes: PositiveFloat | None = None  # cap on the whole sweep; rerun to continue
    pretrain: PretrainConfig = field(default_factory=_default_pretrain)

    def check(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1), e.g. 0.1")
        if self.data_depth and not self.data_tokens:
            raise ConfigError(f"data_depth={self.data_depth} needs data_tokens = [...] (token counts to "
                              "train that depth on); set both or neither")
        if not self.budgets and not self.size_tokens and not self.data_depth:
            raise ConfigError("the sweep has no points: give budgets = [...], size_tokens or data_depth")


@dataclass(frozen=True)
class Point:
    name: str
    kind: str            # isoflop | size | data
    depth: int
    budget: float        # the IsoFLOP budget (0 for size and data points)
    model: ModelConfig
    steps: int
    tokens: int          # D = steps x tokens per step
    flops: float         # C = D x training FLOPs per token (Chinchilla's count)


def family_model(cfg: SweepConfig, depth: int, vocab_size: int) -> ModelConfig:
    """The depth-`depth` member of the family: pretrain.model's flavour at n_layer = depth, d_model =
    aspect x depth."""
    d_model = cfg.aspect * depth
    if d_model % cfg.head_dim:
        raise ConfigError(f"aspect={cfg.aspect} x depth={depth} = {d_model} is not a multiple of "
                          f"head_dim={cfg.head_dim}; make aspect a multiple of head_dim")
    model = dataclasses.replace(cfg.pretrain.model, n_layer=depth, d_model=d_model,
                                n_head=d_model // cfg.head_dim, n_kv_head=None, vocab_size=vocab_size)
    return model.validate()


def tokens_per_step(cfg: SweepConfig) -> int:
    p = cfg.pretrain
    return p.data.batch_size * (p.data.block_size or p.model.block_size) * p.train.accum_steps


def plan_points(cfg: SweepConfig, vocab_size: int) -> tuple[list[Point], list[str]]:
    """The sweep's points, and a line for each one left out (too few steps)."""
    per_step = tokens_per_step(cfg)
    seq = cfg.pretrain.data.block_size or cfg.pretrain.model.block_size
    wanted: list[tuple[str, str, int, float, float]] = []  # name, kind, depth, budget, tokens
    for budget in cfg.budgets:
        for depth in cfg.depths:
            model = family_model(cfg, depth, vocab_size)
            tokens = budget / train_flops_per_token(model, seq)["chinchilla"]
            wanted.append((f"iso-{budget:.0e}-d{depth}".replace("+", ""), "isoflop", depth, budget, tokens))
    if cfg.size_tokens:
        wanted += [(f"size-d{d}", "size", d, 0.0, cfg.size_tokens) for d in cfg.depths]
    if cfg.data_depth:
        wanted += [(f"data-d{cfg.data_depth}-{t:.0e}".replace("+", ""), "data", cfg.data_depth, 0.0, t)
                   for t in cfg.data_tokens]
    points, left_out = [], []
    for name, kind, depth, budget, tokens in wanted:
        model = family_model(cfg, depth, vocab_size)
        steps = round(tokens / per_step)
        if steps < cfg.min_steps:
            left_out.append(f"{name}: {steps} steps < min_steps={cfg.min_steps}")
            continue
        flops = steps * per_step * train_flops_per_token(model, seq)["chinchilla"]
        points.append(Point(name, kind, depth, budget, model, steps, steps * per_step, flops))
    return points, left_out


def point_config(cfg: SweepConfig, point: Point, out: Path, minutes_left: float | None) -> PretrainConfig:
    p = cfg.pretrain
    optim = dataclasses.replace(p.optim, max_steps=point.steps,
                                warmup_steps=math.ceil(cfg.warmup_fraction * point.steps))
    train = dataclasses.replace(p.train, out_dir=str(out / "points"), run_name=point.name, eval_every=0,
                                eval_batches=WHOLE_SPLIT, ckpt_every=0, keep_last=1, keep_best=False,
                                progress=False, plot=False, threads=cfg.threads, max_minutes=minutes_left,
                                tokens_per_step=None, overwrite=False)
    return dataclasses.replace(p, model=point.model, optim=optim, train=train)


def _result(point: Point, summary: dict, wall_s: float, train_tokens: int) -> dict:
    counts = param_counts(point.model)
    return {"name": point.name, "kind": point.kind, "depth": point.depth, "budget": point.budget,
            "N": counts["total"], "N_nonembed": counts["non_embedding"], "D": point.tokens, "C": point.flops,
            "C_6ND": 6.0 * counts["total"] * point.tokens, "loss": summary["val_loss"],
            "val_coverage": summary.get("val_coverage", 1.0), "epochs": point.tokens / train_tokens,
            "steps": summary["step"], "wall_s": wall_s}


def run_point(cfg: PretrainConfig) -> dict:
    """One point: run_pretrain, resuming the point's own checkpoint if a stopped sweep left one."""
    started = time.perf_counter()
    summary = run_pretrain(cfg, resume="auto")
    return {**summary, "wall_s": time.perf_counter() - started}


def _run_point_process(config_path: Path) -> dict:
    """run_point in a fresh process (own torch threads); its summary comes back as JSON on stdout's last
    line."""
    proc = subprocess.run([sys.executable, "-m", "llmlab.scaling.sweep", str(config_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"sweep point {config_path} failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torchrun() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _jobs(cfg: SweepConfig) -> int:
    if _torchrun()[1] > 1:
        return 1  # every rank takes part in each point, one point at a time
    if cfg.jobs:
        return cfg.jobs
    if cfg.pretrain.train.device not in ("cpu",):
        import torch

        if cfg.pretrain.train.device != "auto" or torch.cuda.is_available():
            return 1
    return max(1, (os.cpu_count() or 1) // cfg.threads)


def _stamp(cfg: SweepConfig) -> dict:
    """The settings that decide the points and their results (not how many run at once or for how long)."""
    settings = dataclasses.asdict(cfg)
    for key in ("jobs", "threads", "max_minutes"):
        settings.pop(key)
    settings["pretrain"]["train"].pop("max_minutes", None)
    return json.loads(json.dumps(settings, default=str))


def _check_out(cfg: SweepConfig, out: Path, overwrite: bool) -> None:
    stamp_path = out / "sweep.json"
    check_output(out, inputs=[cfg.pretrain.data.shards, cfg.pretrain.data.tokenizer], overwrite=True,
                 into=True, kept=True, what="sweep directory")
    if stamp_path.is_file() and not overwrite:
        if json.loads(stamp_path.read_text()) != _stamp(cfg):
            raise ConfigError(f"{out} holds a sweep with other settings (see {stamp_path}); use another "
                              "--out, or --overwrite to start that sweep over")
    elif out.is_dir() and any(out.iterdir()) and not stamp_path.is_file() and not overwrite:
        raise ConfigError(f"{out} is not empty and holds no sweep; use another --out or --overwrite")


def run_sweep(cfg: SweepConfig, out: str | os.PathLike, overwrite: bool = False, dry_run: bool = False,
              log=print) -> dict:
    """Run (or continue) the sweep into OUT; return {"points", "done", "left", "left_out", "results"}."""
    from llmlab.data.shards import read_meta
    from llmlab.fsutil import remove_path

    cfg = check_config(cfg)
    out = Path(out)
    meta = read_meta(cfg.pretrain.data.shards)
    vocab = int(meta["tokenizer"]["vocab_size"])
    points, left_out = plan_points(cfg, vocab)
    for line in left_out:
        log(f"left out {line}")
    if dry_run:
        for p in points:
            log(f"{p.name}: N={param_counts(p.model)['total']:,} D={p.tokens:,} C={p.flops:.3g} "
                f"steps={p.steps}")
        return {"points": [p.name for p in points], "done": 0, "left": len(points), "left_out": left_out}
    rank0 = _torchrun()[0] == 0  # under torchrun only rank 0 writes the sweep's own files
    if rank0:
        _check_out(cfg, out, overwrite)
        if overwrite and out.is_dir():
            for child in ("points", "results.csv", "curves.csv", "sweep.json"):
                remove_path(out / child)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "sweep.json", json.dumps(_stamp(cfg), indent=2) + "\n")
    train_tokens = _split_tokens(cfg)
    todo = [p for p in points if not (out / "points" / p.name / "result.json").is_file()]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} already done, {len(todo)} to run")
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else None
    jobs = min(_jobs(cfg), max(1, len(todo)))

    stopped: list[str] = []  # a point cut short by a signal: start no more

    def one(point: Point) -> None:
        minutes = None if deadline is None else (deadline - time.perf_counter()) / 60
        if stopped or (minutes is not None and minutes <= 0):
            return
        pcfg = point_config(cfg, point, out, minutes)
        if jobs == 1:
            summary = run_point(pcfg)
        else:
            path = out / "points" / f"{point.name}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, to_toml(pcfg))
            summary = _run_point_process(path)
        if summary["step"] < point.steps:  # stopped early: the next run resumes it from its checkpoint
            timed_out = deadline is not None and time.perf_counter() >= deadline - 1
            if not timed_out:
                stopped.append(point.name)
            log(f"{point.name}: stopped at step {summary['step']}/{point.steps} "
                f"({'time budget' if timed_out else 'signal'})")
            return
        if not rank0:
            return
        result = _result(point, summary, summary["wall_s"], train_tokens)
        write_text_atomic(out / "points" / point.name / "result.json", json.dumps(result, indent=2) + "\n")
        log(f"{point.name}: N={result['N']:,} D={result['D']:,} C={result['C']:.3g} "
            f"loss={result['loss']:.4f} ({result['wall_s']:.0f} s)")
        write_results(out, points)

    if jobs == 1:
        for point in todo:
            one(point)
    else:
        with ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(one, p) for p in todo]:
                future.result()
    results = write_results(out, points) if rank0 else []
    left = len(points) - len(results)
    log(f"sweep: {len(results)}/{len(points)} points done -> {out / 'results.csv'}"
        + (f"; {left} left, rerun to continue" if left else ""))
    return {"points": [p.name for p in points], "done": len(results), "left": left, "left_out": left_out,
            "results": results}


def _split_tokens(cfg: SweepConfig) -> int:
    from llmlab.data.loader import TokenLoader

    return TokenLoader(cfg.pretrain.data.shards, "train", 1, 1).num_tokens


def write_results(out: Path, points: list[Point]) -> list[dict]:
    """Gather the finished points' result.json into OUT/results.csv and their curves into OUT/curves.csv."""
    results, curves = [], []
    for p in points:
        path = out / "points" / p.name / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            curves += _curve(out / "points" / p.name, results[-1])
    write_text_atomic(out / "results.csv", _csv(RESULT_COLUMNS, results))
    write_text_atomic(out / "curves.csv", _csv(CURVE_COLUMNS, curves))
    return results


def _curve(run_dir: Path, result: dict) -> list[dict]:
    """The point's training loss against tokens and FLOPs so far (every logged step)."""
    per_token = result["C"] / result["D"]
    return [{"name": result["name"], "N": result["N"], "D": r["tokens"], "C": r["tokens"] * per_token,
             "loss": r["loss"]}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and r.get("tokens")]


def _csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def load_sweep_config(path: str | None, overrides: list[str] | tuple = ()) -> SweepConfig:
    return load_config(SweepConfig, path, overrides)


def _main(config_path: str) -> None:
    """A point run in its own process: the PretrainConfig TOML in, the summary as JSON on stdout."""
    cfg = load_config(PretrainConfig, config_path)
    print(json.dumps(run_point(cfg)))


if __name__ == "__main__":
    _main(sys.argv[1])
