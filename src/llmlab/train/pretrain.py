"""Next-token pretraining: PretrainConfig and run_pretrain(cfg), behind `llmlab pretrain`.

    llmlab pretrain --config configs/cpu-demo.toml train.run_name=demo optim.max_steps=500
    llmlab pretrain --config configs/cpu-demo.toml --resume auto      # continue runs/demo

A Transformer, a TokenLoader over prepared shards and the next-token objective, run by the shared launcher
(llmlab/train/launch.py: run directory, devices, DDP/FSDP2, checkpoints, resume). Before anything is
written it resolves and checks the config: model.vocab_size = 0 (the default)
takes the shards' vocabulary and any other value must equal it; data.block_size defaults to (and may
not exceed) model.block_size; train.tokens_per_step, when set, fixes the gradient-accumulation steps
(tokens_per_step = batch_size x block_size x accum_steps x world_size). The run directory
(train.out_dir/train.run_name) gets config.toml (the resolved config), metrics.jsonl, ckpt-STEP/
checkpoints (each with a copy of the tokenizer), best.json (the lowest-val-loss checkpoint, kept by
pruning), plots/, summary.json and, with train.tensorboard=true, tensorboard/. With distill.teacher set,
the loss is distillation towards that checkpoint (llmlab/train/distill.py); val_loss stays cross-entropy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.config import NonEmptyStr, NonNegativeInt, PositiveInt, check_config
from llmlab.errors import ConfigError, ModelError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer.identity import (
    TokenizerId,
    checkpoint_tokenizer,
    directory_tokenizer,
    require_same_tokenizer,
    shards_tokenizer,
)
from llmlab.train.checkpoint import unwrap
from llmlab.train.distill import Distillation, DistillConfig, load_teacher
from llmlab.train.distributed import ParallelConfig, world
from llmlab.train.launch import Built, Plan, Run, launch, prepare_run_dir, seed_everything
from llmlab.train.objective import NextToken
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig

__all__ = ["PretrainConfig", "DataConfig", "run_pretrain", "resolve_config", "lm_loss", "make_eval",
           "seed_everything"]
_prepare_run_dir = prepare_run_dir  # align/sft.py imports it from here until it runs on launch


@dataclass
class DataConfig:
    shards: NonEmptyStr = "data/shards"  # a directory written by `llmlab data prepare`
    block_size: PositiveInt | None = None  # training sequence length; None -> model.block_size
    batch_size: PositiveInt = 8          # sequences per micro-batch (per process)
    seed: NonNegativeInt = 0             # order of the training windows
    tokenizer: str | None = None         # copied into every checkpoint; None -> the shard dir's own copy


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=0))  # 0: from the shards
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="pretrain"))
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # a teacher turns on distillation


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy (nats/token); the softmax runs in fp32 even under bf16 autocast.

    An llmlab Transformer, bare or wrapped (DDP, FSDP2, torch.compile), is called as model(x, targets=y):
    its chunked head + cross-entropy never materialises the [B, T, vocab] logits, and the call goes
    through the wrapper's forward. Any other module takes the plain logits path.
    """
    x, y = batch
    if hasattr(unwrap(model), "loss"):
        return model(x, targets=y), {}
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)), {}


def make_eval(loader, max_batches: int):
    """eval_fn(model) -> {"val_loss", "val_coverage"}: token-weighted mean loss over at most `max_batches`
    val batches of windows spread evenly over the whole split (the same ones every time), so the estimate is
    unbiased; val_coverage is the fraction of the split's windows read (1.0: the whole split)."""
    coverage = len(loader.eval_windows(max_batches)) / loader.val_windows

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for x, y in loader.iter_eval(max_batches, spread=True):
            loss, _ = lm_loss(model, (x, y))
            total += loss.item() * y.numel()
            count += y.numel()
        return {"val_loss": total / count, "val_coverage": coverage}

    return eval_fn


def resolve_config(cfg: PretrainConfig, meta: dict) -> PretrainConfig:
    """Check every value, fill the derived ones (vocab, block size, accumulation) and check those; nothing is
    written."""
    cfg = check_config(cfg)
    shards = cfg.data.shards
    vocab = int(meta["tokenizer"]["vocab_size"])
    model = cfg.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=vocab)
    elif model.vocab_size != vocab:
        raise ConfigError(f"model.vocab_size={model.vocab_size} does not match the tokenizer of {shards} "
                          f"({vocab} tokens, see its meta.json); set model.vocab_size={vocab} or drop it "
                          "(0 = from the shards)")
    try:
        model.validate()
    except ModelError as e:
        raise ConfigError(str(e)) from e
    block = cfg.data.block_size or model.block_size
    if block > model.block_size:
        raise ConfigError(f"data.block_size={block} is longer than model.block_size={model.block_size}; "
                          f"lower data.block_size or raise model.block_size")
    train = cfg.train
    if train.tokens_per_step:
        per_micro = cfg.data.batch_size * block * world()[1]
        accum, rest = divmod(train.tokens_per_step, per_micro)
        if rest or accum == 0:
            near = max(1, round(train.tokens_per_step / per_micro)) * per_micro
            raise ConfigError(f"train.tokens_per_step={train.tokens_per_step} is not a multiple of "
                              f"batch_size x block_size x world_size = {per_micro}; use "
                              f"train.tokens_per_step={near}")
        train = dataclasses.replace(train, accum_steps=accum)
    data = dataclasses.replace(cfg.data, block_size=block)
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def _run_tokenizer(cfg: PretrainConfig, shards: TokenizerId) -> tuple[Path | None, str | None]:
    """The tokenizer copied into every checkpoint (data.tokenizer, else the shards' own copy) and its
    fingerprint; a data.tokenizer must be the one that made the shards."""
    if not cfg.data.tokenizer:
        return shards.directory, shards.fingerprint
    path = Path(cfg.data.tokenizer)
    if not path.is_dir():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not a directory; point it at a saved "
                          "tokenizer or drop it to use the shard directory's copy")
    tok = directory_tokenizer(path)
    require_same_tokenizer(tok, shards, "point data.tokenizer at the tokenizer that made the shards, or "
                                        "drop it")
    return path, tok.fingerprint


def run_pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Pretrain per `cfg` (resume: a checkpoint, a run dir, "auto" or "best"); return the run's summary."""
    cfg = check_config(cfg)  # before anything else, so a bad value is reported first
    tokenizer: list[TokenizerId] = []  # found by resolve, copied into checkpoints by build

    def resolve(cfg: PretrainConfig) -> Plan:
        plan, tok = _plan(cfg)
        tokenizer.append(tok)
        return plan

    return launch(cfg, lambda run: _build(run, tokenizer[0]), resume, resolve=resolve)


def _plan(cfg: PretrainConfig) -> tuple[Plan, TokenizerId]:
    """The resolved config (vocabulary and accumulation from the shards and the world size), the inputs, a
    resume check (the checkpoint must have been trained with the shards' tokenizer), and the tokenizer to
    copy into checkpoints."""
    from llmlab.data.shards import read_meta

    meta = read_meta(cfg.data.shards)  # DataError naming the dir and the fix if it is missing/unfinished
    cfg = resolve_config(cfg, meta)
    shards_id = shards_tokenizer(cfg.data.shards, meta)
    tokenizer_dir, tokenizer_fingerprint = _run_tokenizer(cfg, shards_id)

    def check_resume(path: Path) -> None:
        require_same_tokenizer(checkpoint_tokenizer(path, cfg.model.vocab_size), shards_id,
                               "resume on shards made with the run's tokenizer, or start a new run")

    plan = Plan(cfg, inputs=[cfg.data.shards, cfg.data.tokenizer, cfg.distill.teacher],
                check_resume=check_resume)
    return plan, TokenizerId(f"the training data {cfg.data.shards}", cfg.model.vocab_size,
                             tokenizer_fingerprint, tokenizer_dir)


def _build(run: Run, tokenizer: TokenizerId) -> Built:
    """The Transformer, the train loader and the objective: next-token cross-entropy, or distillation
    towards distill.teacher; both evaluate the cross-entropy on the val split."""
    from llmlab.data.loader import TokenLoader

    cfg, device, d = run.config, run.device, run.config.data
    model = Transformer(cfg.model).to(device)
    loader = dict(seed=d.seed, rank=run.rank, world_size=run.world_size, device=device)
    train_loader = TokenLoader(d.shards, "train", d.block_size, d.batch_size, **loader)
    val_loader = TokenLoader(d.shards, "val", d.block_size, d.batch_size, **loader)
    eval_fn = make_eval(val_loader, cfg.train.eval_batches)
    objective = NextToken(eval_fn)
    if cfg.distill.teacher:
        teacher = load_teacher(cfg.distill, cfg.model.vocab_size, d.block_size, tokenizer, device)
        objective = Distillation(teacher, cfg.distill.weight, cfg.distill.temperature, eval_fn)
    tokens_per_step = cfg.train.accum_steps * d.batch_size * d.block_size * run.world_size
    return Built(model, objective, train_loader, flops_per_token=model.flops_per_token(d.block_size),
                 tokenizer=tokenizer, summary={"tokens_per_step": tokens_per_step})
