"""Checkpoints: runs/NAME/ckpt-STEP/{config.json, model.safetensors, train_state.pt, tokenizer/}.

A checkpoint is written into a temporary sibling directory, fsynced and renamed into place
(llmlab.fsutil.atomic_dir), so a directory named ckpt-STEP is always complete; a crash mid-write leaves
only a hidden .ckpt-STEP.*.tmp that `latest()` ignores and the next save's pruning removes.

- config.json + model.safetensors come from the model's own `save(dir)` (so `Transformer.load(ckpt)`
  works on any checkpoint); a model without `save` gets a safetensors file of its state dict.
- train_state.pt holds only tensors and primitive containers (optimizer state, step, tokens, the batch
  source's state, RNG states, callback state) so it loads with torch.load(weights_only=True).
- tokenizer/ is a copy of the run's tokenizer, so a checkpoint alone is enough for generate/export, and
  tokenizer_id.json records its fingerprint (llmlab.tokenizer.identity checks tokenizers and shards
  against it).

Everything is validated where it is read: config.json (typed and finite, and matching the model), the
weights (readable, every tensor present with its shape and kind), train_state.pt (its entries); each
failure is one CheckpointError naming the file and, on resume, the run's previous complete checkpoint.
`--resume auto` takes the newest checkpoint whose files are all present (a directory missing one is
incomplete and skipped); one whose files are present but corrupt is refused, never skipped silently.

`Checkpointer` is the single place the Trainer saves, finds, loads and prunes checkpoints; a distributed
variant (torch.distributed.checkpoint under FSDP) can subclass it and override `write_model`/`read_model`.

Pruning keeps the newest `keep_last`, the `pinned` steps (the spike guard's rollback ring) and, with
`keep_best`, the best checkpoint so far by the objective's best metric (lowest val_loss for pretraining,
highest held-out accuracy for a reward model). That one is named by RUN_DIR/best.json ({"step", "path",
"metric", METRIC: value, "higher_is_better"}, written atomically after the checkpoint itself, so it only
ever names a complete directory); it survives resume, and `--resume best` resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from llmlab.config import from_dict
from llmlab.errors import CheckpointError, ConfigError
from llmlab.fsutil import atomic_dir, write_text_atomic
from llmlab.model.transformer import check_state, read_meta, read_weights, refuse_extensions
from llmlab.tokenizer.identity import TOKENIZER_ID_FILE, write_tokenizer_id

REQUIRED_FILES = ("config.json", "model.safetensors", "train_state.pt")
STATE_VERSION = 1
BEST_FILE = "best.json"
_CKPT_NAME = re.compile(r"^ckpt-(\d+)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- RNG state (weights_only-safe)

def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch CPU/CUDA, NumPy's global, Python's `random`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- one checkpoint directory

def step_of(path: Path) -> int | None:
    m = _CKPT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def check_complete(path: str | Path) -> Path:
    """Raise a CheckpointError naming the first missing file; return the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a ckpt-STEP directory or "
                              "--resume auto")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; it is incomplete, "
                                  "resume from another checkpoint (--resume auto picks the newest "
                                  "complete one)")
    return path


def _another_checkpoint(path: Path) -> str:
    """The fix for an unreadable checkpoint: the run's newest complete one before it, if there is one."""
    step = step_of(path)
    other = Checkpointer(path.parent).latest(max_step=step - 1) if step is not None else None
    return f"resume from {other} instead" if other is not None else "resume from another checkpoint"


# What train_state.pt must hold (a DCP checkpoint keeps its optimizer state in dcp/ instead).
_STATE_TYPES = {"step": int, "tokens": int, "batches": dict, "rng": dict, "files": list}


def read_train_state(path: str | Path) -> dict[str, Any]:
    """train_state.pt of a complete checkpoint, loaded with weights_only=True (never unpickling anything
    else), its entries and the files listed in it checked; CheckpointError naming the file for every
    failure."""
    path = check_complete(path)
    file = path / "train_state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt pickle or zip raises several different types
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}); it is truncated or corrupt: "
                              f"{_another_checkpoint(path)}") from e
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{file} is not a training state llmlab wrote ({problem}); "
                              f"{_another_checkpoint(path)}")
    for name in state["files"]:
        if not isinstance(name, str) or not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}; it is incomplete, "
                                  f"{_another_checkpoint(path)}")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    if state.get("version") != STATE_VERSION:
        return f"version {state.get('version')!r}, expected {STATE_VERSION}"
    for key, kind in _STATE_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is missing or not a {kind.__name__}"
    if "optimizer" not in state and not state.get("dcp"):
        return "no optimizer state"
    return None


def check_model_config(path: str | Path, model: nn.Module) -> None:
    """A checkpoint's config.json must be valid and describe the model we are loading it into."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        return
    path = Path(path)
    meta = read_meta(path)
    refuse_extensions(path, meta)
    try:
        theirs = dataclasses.asdict(from_dict(type(config), meta))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}; {_another_checkpoint(path)}") from e
    ours = dataclasses.asdict(config)
    diffs = [k for k in ours if _norm(theirs[k]) != _norm(ours[k])]
    if diffs:
        k = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:])})" if len(diffs) > 1 else ""
        raise CheckpointError(f"checkpoint {path} has model.{k}={theirs[k]!r} but the config asks for "
                              f"{ours[k]!r}{more}; set model.{k}={json.dumps(theirs[k])} to resume it, "
                              "or start a new run (train.run_name=...)")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def write_model(model: nn.Module, directory: Path) -> None:
    """config.json + model.safetensors via the model's own writer, else from its state dict.

    `save_into(dir)` writes into a directory we already own (our atomic_dir); a model with only
    `save(dir)` (which may replace `dir` whole) gets a subdirectory moved into place.
    """
    if hasattr(model, "save_into"):
        model.save_into(directory)
        return
    if hasattr(model, "save"):
        model.save(directory / "model")
        for item in (directory / "model").iterdir():
            item.rename(directory / item.name)
        (directory / "model").rmdir()
        return
    save_model(model, str(directory / "model.safetensors"))
    config = getattr(model, "config", None)
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    (directory / "config.json").write_text(json.dumps(settings, indent=2))


def read_model(model: nn.Module, directory: Path) -> None:
    """Load model.safetensors into `model` in place: config.json valid and matching, the file readable, every
    tensor present with its shape and kind (CheckpointError naming the file otherwise)."""
    check_model_config(directory, model)
    file = Path(directory) / "model.safetensors"
    state = read_weights(file, fix=_another_checkpoint(Path(directory)))
    check_state(model, state, file)
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- a run's checkpoints

def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """best.json of a run if it names a complete checkpoint, else None: {"step", "path", "metric", "value",
    "higher_is_better", METRIC: value} (a best.json without "metric" is by val_loss, lower is better)."""
    run_dir = Path(run_dir)
    try:
        best = json.loads((run_dir / BEST_FILE).read_text())
        path = run_dir / best["path"]
        metric = str(best.get("metric", "val_loss"))
        step, value = int(best["step"]), float(best[metric])
        higher = bool(best.get("higher_is_better", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if step_of(path) != step or not all((path / name).is_file() for name in REQUIRED_FILES):
        return None
    return {"step": step, "path": path, "metric": metric, "value": value, "higher_is_better": higher,
            metric: value}


class Checkpointer:
    """Saves ckpt-STEP directories under `run_dir`; keeps the newest `keep_last`, pinned steps, the best."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, tokenizer_dir: str | Path | None = None,
                 keep_best: bool = True, tokenizer_fingerprint: str | None = None):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric, self.higher_is_better = "val_loss", False  # the Trainer sets its objective's
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.tokenizer_fingerprint = tokenizer_fingerprint  # recorded in each checkpoint's tokenizer_id.json
        self.pinned: set[int] = set()  # steps that pruning must keep (e.g. the spike guard's rollback ring)

    def path(self, step: int) -> Path:
        return self.run_dir / f"ckpt-{step:06d}"

    def save(self, step: int, model: nn.Module, train_state: dict[str, Any]) -> Path:
        target = self.path(step)
        self.forget_best(step)
        with atomic_dir(target) as tmp:
            self.write_model(unwrap(model), tmp)
            files = list(REQUIRED_FILES) + self.write_tokenizer(tmp)
            torch.save({**train_state, "version": STATE_VERSION, "files": files}, tmp / "train_state.pt")
        self.prune()
        return target

    def write_tokenizer(self, directory: Path) -> list[str]:
        """Copy the run's tokenizer into a checkpoint being written and record its fingerprint; return the
        files written (relative paths, for train_state's list)."""
        files = []
        if self.tokenizer_dir is not None:
            shutil.copytree(self.tokenizer_dir, directory / "tokenizer")
            files += [f"tokenizer/{p.relative_to(self.tokenizer_dir)}"
                      for p in sorted(self.tokenizer_dir.rglob("*")) if p.is_file()]
        if self.tokenizer_fingerprint is not None:
            write_tokenizer_id(directory, self.tokenizer_fingerprint)
            files.append(TOKENIZER_ID_FILE)
        return files

    write_model = staticmethod(write_model)
    read_model = staticmethod(read_model)

    def load(self, path: str | Path, model: nn.Module) -> dict[str, Any]:
        """Load weights into `model`; return the train_state dict for the caller to apply."""
        state = read_train_state(path)
        self.read_model(unwrap(model), Path(path))
        return state

    def all(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete-looking checkpoint, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [(step_of(p), p) for p in self.run_dir.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(found)

    def latest(self, max_step: int | None = None) -> Path | None:
        """Newest complete checkpoint (at or before `max_step`), or None."""
        for step, path in reversed(self.all()):
            if max_step is not None and step > max_step:
                continue
            if all((path / name).is_file() for name in REQUIRED_FILES):
                return path
        return None

    def best(self) -> dict[str, Any] | None:
        """The best checkpoint (read_best's dict) when keep_best is on, else None."""
        return read_best(self.run_dir) if self.keep_best else None

    def forget_best(self, step: int) -> None:
        """Before ckpt-STEP is written again: drop a best.json naming it (its val loss no longer applies)."""
        best = self.best()
        if best is not None and best["step"] == step:
            (self.run_dir / BEST_FILE).unlink(missing_ok=True)

    def beats_best(self, step: int, value: float | None) -> bool:
        """Whether saving ckpt-STEP with this value of best_metric makes it the best (update_best's rule, no
        side effects; a best.json naming STEP itself, or another metric, does not count, as rewriting
        ckpt-STEP forgets it and values of different metrics do not compare)."""
        if not self.keep_best or value is None or not math.isfinite(value):
            return False
        best = self.best()
        if best is None or best["step"] == step or best["metric"] != self.best_metric:
            return True
        return value > best["value"] if self.higher_is_better else value < best["value"]

    def update_best(self, step: int, value: float | None) -> bool:
        """After saving ckpt-STEP (rank 0): record it in best.json if its best_metric value beats the best
        so far (a tie keeps the earlier one).

        `value` must have been measured at this step (None: not evaluated). A checkpoint saved over
        the best one's directory (after a rollback or a resume from an earlier step) loses that record,
        since the old weights are gone (see forget_best). Returns whether ckpt-STEP is now the best.
        """
        if not self.beats_best(step, value):
            return False
        record = {"step": step, "path": self.path(step).name, "metric": self.best_metric,
                  self.best_metric: value, "higher_is_better": self.higher_is_better}
        write_text_atomic(self.run_dir / BEST_FILE, json.dumps(record) + "\n")
        self.prune()  # the previous best may now be outside keep_last
        return True

    def prune(self) -> None:
        """Delete checkpoints beyond the newest keep_last (pinned ones and the best stay), stale temp dirs."""
        for tmp in self.run_dir.glob(".ckpt-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if self.keep_last <= 0:
            return
        best = self.best()
        keep = self.pinned | ({best["step"]} if best else set())
        ckpts = self.all()
        for step, path in ckpts[:-self.keep_last]:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str | Path | None, run_dir: str | Path) -> Path | None:
    """`auto` -> newest complete checkpoint in run_dir (None if there is none); `best` -> the one best.json
    names (the best by the objective's metric); a path -> that checkpoint. A run directory given as the path
    means its newest.
    """
    if resume is None or resume == "":
        return None
    if str(resume) == "auto":
        return Checkpointer(run_dir).latest()
    if str(resume) == "best":
        best = read_best(run_dir)
        if best is None:
            raise CheckpointError(f"{Path(run_dir) / BEST_FILE} is missing or names no complete checkpoint "
                                  "(train.keep_best=false, or no evaluation at a checkpoint step yet); "
                                  "use --resume auto or a ckpt-STEP path")
        return best["path"]
    path = Path(resume)
    if path.is_dir() and step_of(path) is None and not (path / "train_state.pt").exists():
        latest = Checkpointer(path).latest()
        if latest is None:
            raise CheckpointError(f"{path} holds no complete checkpoint; pass a ckpt-STEP directory")
        return latest
    check_complete(path)
    return path
