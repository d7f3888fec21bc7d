"""Distributed training on PyTorch's own engine: torchrun init, DDP / FSDP2, compile, checkpoints, signals.

    torchrun --standalone --nproc_per_node 8 -m llmlab pretrain --config C.toml parallel.strategy=fsdp

The model knows nothing of parallelism (the torchtitan way); `parallelize(model, cfg, device)` applies,
in order: activation checkpointing per block, torch.compile per block, then DDP around the whole model or
FSDP2 `fully_shard` on every block and the root, with a MixedPrecisionPolicy (bf16 parameters for compute
and fp32 gradient reduction on GPUs; fp32 throughout on CPU, where bf16 matmuls are slow).

- `init_distributed()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts the process group:
  NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU; `process_group()` does so for the
  length of a job and destroys the group at its end.
- `DistCheckpointer` writes FSDP checkpoints through torch.distributed.checkpoint (DCP): every rank writes
  its shards of the model and optimizer state (`get_model_state_dict` / `get_optimizer_state_dict`) into
  ckpt-STEP/dcp/, and rank 0 adds a consolidated model.safetensors + config.json (so `Transformer.load`,
  `generate` and export work on it in one process) and train_state.pt. A DCP checkpoint reshards on load,
  so one saved by N ranks resumes on any number of ranks, including a single process.
- `stop_on_signals(trainer)`: SIGTERM / SIGINT set `trainer.should_stop`; the trainer finishes the
  step, writes a checkpoint and returns, and the process exits 0. A second signal interrupts at once.
  Under torchrun the signal may reach one rank only, or the ranks at different moments: all of them stop
  after the first step at whose end any had it (the trainer agrees on it with one all-reduce).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmlab.config import check_config
from llmlab.errors import CheckpointError, ConfigError
from llmlab.fsutil import fsync_dir
from llmlab.train.checkpoint import REQUIRED_FILES, STATE_VERSION, Checkpointer, read_train_state, unwrap

Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class ParallelConfig:
    """`parallel.*` keys: how the model is spread over processes (see llmlab/train/distributed.py)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: ddp when launched with >1 process
    compile: bool = False                # torch.compile each block (first steps are slow while it compiles)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    param_dtype: Precision = "auto"      # fsdp compute dtype: auto = bf16 on CUDA, fp32 on CPU | bf16 | fp32
    reduce_dtype: Precision = "fp32"     # fsdp gradient reduce-scatter dtype
    tf32: bool = True                    # TF32 matmuls on Ampere+ GPUs (fp32 ops outside autocast)

    def resolved_strategy(self, world_size: int) -> str:
        if self.strategy == "auto":
            return "ddp" if world_size > 1 else "none"
        return self.strategy


def world() -> tuple[int, int]:
    """(rank, world_size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device | None]:
    """Start the process group torchrun describes (env RANK, WORLD_SIZE); no-op in a single process.

    Returns (rank, world_size, device): the process's device when it is distributed (cuda:LOCAL_RANK under
    NCCL, cpu under gloo), else None (the caller resolves its own device).
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return *world(), None
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), dev


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """`init_distributed(device)` for the length of a job; yields the device it returns.

    A group started here is destroyed on the way out: a gloo process that reaches interpreter exit with
    its group alive can abort there (SIGABRT, "terminate called without an active exception") while its
    worker threads are torn down, which fails a run that finished. After a normal end every rank first
    meets at a barrier, so none tears down while another is still in a collective; after an exception it
    is destroyed at once (the other ranks may never arrive). A group the caller started is left alone.
    """
    started_here = not (dist.is_available() and dist.is_initialized())
    _, _, dev = init_distributed(device)
    owned = started_here and dist.is_available() and dist.is_initialized()
    try:
        yield dev
    except BaseException:
        if owned:
            dist.destroy_process_group()
        raise
    if owned:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- parallelize

def _checkpointed(forward, *args, **kwargs):
    # Recompute the block in backward only while training without a KV cache (generation passes one).
    if torch.is_grad_enabled() and args[2:3] in ((None,), ()):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__} has no .blocks list; parallel.strategy=fsdp, compile and "
                          "activation_checkpointing apply per transformer block")
    return list(blocks)


def _dtype(name: str, device: torch.device, default_gpu: torch.dtype) -> torch.dtype:
    if name == "auto":
        return default_gpu if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to `model` (on `device`); return what to call."""
    cfg = check_config(cfg, "parallel.")
    _, world_size = world()
    strategy = cfg.resolved_strategy(world_size)
    if strategy != "none" and not dist.is_initialized():
        raise ConfigError(f"parallel.strategy={strategy} needs a process group; launch with torchrun "
                          "(e.g. torchrun --standalone --nproc_per_node 2 -m llmlab pretrain ...) or set "
                          "parallel.strategy=none")
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for block in _blocks(model) if (cfg.activation_checkpointing or cfg.compile) else []:
        if cfg.activation_checkpointing:
            block.forward = functools.partial(_checkpointed, block.forward)
        if cfg.compile:
            block.compile()  # per block: one graph reused n_layer times, and FSDP hooks stay outside it
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype, device, torch.bfloat16),
                                  reduce_dtype=_dtype(cfg.reduce_dtype, device, torch.float32))
        for block in _blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


# ---------------------------------------------------------------- DCP checkpoints

def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


class DistCheckpointer(Checkpointer):
    """Checkpoints through torch.distributed.checkpoint (see module docstring); every rank calls save/load.

    `attach(optimizer)` must be called before use (the optimizer state is written through DCP too).
    Works in a single process as well, which is how an N-rank checkpoint resumes on one rank.
    """

    collective = True  # the Trainer calls save() on every rank

    def __init__(self, run_dir, keep_last: int = 3, tokenizer_dir=None, keep_best: bool = True,
                 tokenizer_fingerprint: str | None = None):
        super().__init__(run_dir, keep_last, tokenizer_dir, keep_best, tokenizer_fingerprint)
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> DistCheckpointer:
        self.optimizer = optimizer
        return self

    def _state(self, model: nn.Module, full: bool = False) -> tuple[dict, dict | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, self.optimizer, options=opts) if not full else None
        return model_sd, optim_sd

    def save(self, step: int, model: nn.Module, train_state: dict[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp

        model = unwrap(model)
        rank, _ = world()
        target = self.path(step)
        tmp = self.run_dir / f".ckpt-{step:06d}.dist.tmp"
        if rank == 0:
            self.forget_best(step)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = self._state(model)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        full, _ = self._state(model, full=True)  # collective: gathers the shards onto rank 0's CPU
        if rank == 0:
            self._write_rank0(tmp, model, full, train_state)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(self.run_dir)
            self.prune()
        barrier()
        return target

    def _write_rank0(self, tmp: Path, model: nn.Module, full: dict, train_state: dict) -> None:
        from safetensors.torch import save_file

        files = list(REQUIRED_FILES)
        state = {k: v for k, v in train_state.items() if k != "optimizer"}  # the optimizer lives in dcp/
        # The consolidated copy: config.json as the model writes it, weights from the gathered state.
        if hasattr(model, "config"):
            import dataclasses
            import json

            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        else:
            (tmp / "config.json").write_text("{}")
        # safetensors refuses two names for one storage; the tied head is rebuilt from tok_emb on load
        # (the model's own writer drops it the same way).
        tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
        tensors = {k: v.contiguous() for k, v in full.items() if not (tied and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"))
        files += self.write_tokenizer(tmp)
        torch.save({**state, "version": STATE_VERSION, "files": files, "dcp": True}, tmp / "train_state.pt")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())

    def load(self, path: str | Path, model: nn.Module) -> dict[str, Any]:
        """Weights and optimizer state from dcp/ (resharded to this world size); a plain checkpoint
        falls back to the safetensors file. Returns the train state with the optimizer's own state dict."""
        path = Path(path)
        if not is_dcp_checkpoint(path):
            state = super().load(path, model)
            return state
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.optimizer is None:
            raise CheckpointError("DistCheckpointer.load needs attach(optimizer) first")
        state = read_train_state(path)
        model = unwrap(model)
        model_sd, optim_sd = self._state(model)
        loaded = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(loaded, checkpoint_id=str(path / "dcp"))
        except Exception as e:  # DCP raises CheckpointException / RuntimeError for mismatched plans
            raise CheckpointError(f"checkpoint {path}/dcp does not fit this model ({str(e)[:200]}); "
                                  "resume with the checkpoint's model config") from e
        set_model_state_dict(model, loaded["model"])
        set_optimizer_state_dict(model, self.optimizer, loaded["optim"])
        state["optimizer"] = self.optimizer.state_dict()  # the Trainer reloads it: a no-op round trip
        return state


# ---------------------------------------------------------------- signals

@contextlib.contextmanager
def stop_on_signals(trainer):
    """While active, SIGTERM/SIGINT set trainer.should_stop: the trainer finishes the step, writes a
    checkpoint and returns from fit (so the process exits 0). A second signal interrupts at once.
    Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.should_stop:
            raise KeyboardInterrupt
        trainer.should_stop = True
        trainer._events.append({"type": "signal", "signal": signal.Signals(signum).name})

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
