"""Supervised fine-tuning: the masked next-token loss on chat data, as an objective for the one trainer.

    llmlab sft --checkpoint runs/demo/ckpt-000500 --data data/tasks/train.jsonl train.run_name=sft
    llmlab sft --checkpoint hf-import/ --data chat.parquet lora.rank=8          # LoRA adapters only

Each example (read_sft + encode_sft: the chat template's ids and its assistant-only loss mask) becomes
inputs ids[:-1] and targets ids[1:], the targets whose mask is 0 set to -100, so the loss falls only on the
assistant's tokens (end-of-turn included), as TRL's completion-only / assistant-only loss. An example longer
than data.block_size + 1 tokens is cut to that length; one left with no target to learn is dropped.

Batches are packed or padded (data.packing). Packed: examples are laid one after another into rows of
block_size tokens, each with its own segment id, so the model attends only within an example and restarts
its positions at 0 (model(x, segment_ids=...)); nothing is wasted on padding. Padded: one example per row,
each batch padded to its longest row. Both give the same loss: the same (context, target) pairs.

The loss is the SUM over kept tokens with weight = kept tokens (llmlab.train.objective.LossOutput), so every
assistant token counts the same whatever the micro-batch or rank it lands in. The held-out loss (val_loss,
token-weighted over data.val, or a data.val_fraction of the training examples held back) picks the best
checkpoint.

`run_sft` (behind `llmlab sft`) is this module's config, data and objective on the shared launcher
(llmlab.train.launch): run directory, resume, spike guard, DDP/FSDP2 and checkpoints as in pretraining. A
tokenizer without the chat template's tokens gets them, and the model rows for them
(llmlab.model.resize.add_chat_tokens, said in one line). With lora.rank > 0 only adapters train
(llmlab.align.lora), the checkpoints hold only them, and RUN_DIR/merged is the merged model at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmlab.align.lora import META_KEY, LoRACheckpointer, LoRAConfig, apply_lora, load_lora
from llmlab.config import Fraction, NonEmptyStr, NonNegativeInt, PositiveInt, check_config
from llmlab.data.chat_data import SFTExample, encode_sft, read_sft
from llmlab.errors import CheckpointError, ConfigError, DataError
from llmlab.fsutil import atomic_dir
from llmlab.model.resize import add_chat_tokens
from llmlab.model.transformer import (
    CONFIG_FILE,
    Transformer,
    config_from_meta,
    read_config,
    read_meta,
    refuse_extensions,
)
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.chat import with_chat_tokens
from llmlab.tokenizer.identity import (
    checkpoint_tokenizer,
    directory_tokenizer,
    fingerprint,
    require_same_tokenizer,
    write_tokenizer_id,
)
from llmlab.train.distributed import ParallelConfig, world
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.objective import LossOutput, Objective, next_token_loss
from llmlab.train.optim import OptimConfig
from llmlab.train.spike import SpikeConfig
from llmlab.train.trainer import TrainConfig

IGNORE = -100
STATE_VERSION = 1

# One training row: inputs, targets (IGNORE where no loss) and segment ids, all the same length.
Row = tuple[np.ndarray, np.ndarray, np.ndarray]


def example_xy(ids: Sequence[int], loss_mask: Sequence[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ids[:-1] and targets ids[1:] (IGNORE where loss_mask[t+1] is 0), cut to max_len tokens."""
    ids_a = np.asarray(ids[:max_len + 1], dtype=np.int64)
    mask = np.asarray(loss_mask[:max_len + 1], dtype=bool)
    y = np.where(mask[1:], ids_a[1:], IGNORE)
    return ids_a[:-1], y


def encode_examples(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int,
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of every encoded example that keeps at least one target after cutting to max_len."""
    out = []
    for ids, mask in pairs:
        if len(ids) != len(mask):
            raise ValueError(f"ids and loss_mask differ in length ({len(ids)} vs {len(mask)})")
        x, y = example_xy(ids, mask, max_len)
        if (y != IGNORE).any():
            out.append((x, y))
    return out


def pack_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int) -> list[Row]:
    """Lay examples one after another into rows of at most block_size tokens (an example never splits);
    each example gets its own segment id within its row."""
    rows: list[Row] = []
    xs, ys, segs, used = [], [], [], 0
    for x, y in examples:
        if used + len(x) > block_size and xs:
            rows.append((np.concatenate(xs), np.concatenate(ys), np.concatenate(segs)))
            xs, ys, segs, used = [], [], [], 0
        segs.append(np.full(len(x), len(xs), dtype=np.int64))
        xs.append(x)
        ys.append(y)
        used += len(x)
    if xs:
        rows.append((np.concatenate(xs), np.concatenate(ys), np.concatenate(segs)))
    return rows


def pad_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Row]:
    """One example per row (segment id 0 throughout)."""
    return [(x, y, np.zeros(len(x), dtype=np.int64)) for x, y in examples]


def collate(rows: Sequence[Row], pad_id: int, packed: bool, device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, ...]:
    """Stack rows into a batch padded to its longest row: (x, y, segment_ids) when packed, else (x, y).

    Padding sits after every real token and its targets are IGNORE, so causal attention alone keeps it out
    of the loss; in a packed batch it also gets a segment id of its own.
    """
    T = max(len(r[0]) for r in rows)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE, dtype=np.int64)
    seg = np.zeros((len(rows), T), dtype=np.int64)
    for i, (rx, ry, rs) in enumerate(rows):
        n = len(rx)
        x[i, :n], y[i, :n], seg[i, :n] = rx, ry, rs
        seg[i, n:] = rs[-1] + 1 if n else 0
    tensors = [torch.from_numpy(a).to(device) for a in (x, y, seg)]
    return tuple(tensors) if packed else tuple(tensors[:2])


def make_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int, packed: bool,
              seed: int) -> list[Row]:
    """Training rows: examples shuffled once by `seed`, then packed (or one per row)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    ordered = [examples[i] for i in order]
    return pack_rows(ordered, block_size) if packed else pad_rows(ordered)


def _fingerprint(rows: Sequence[Row]) -> str:
    h = hashlib.sha256()
    for x, y, s in rows:
        h.update(x.tobytes() + y.tobytes() + s.tobytes())
    return h.hexdigest()[:16]


class SFTBatches:
    """Endless shuffled batches of rows (a new order each epoch), resumable and rank-aware like TokenLoader:
    global batch = batch_size x world_size rows, rank r takes its batch_size slice of each."""

    def __init__(self, rows: list[Row], batch_size: int, *, pad_id: int, packed: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 source: str = "data"):
        self.rows, self.batch_size, self.pad_id, self.packed = rows, batch_size, pad_id, packed
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        global_batch = batch_size * world_size
        self.per_epoch = len(rows) // global_batch
        if self.per_epoch == 0:
            raise DataError(f"{source} gives {len(rows)} training rows, fewer than one batch of "
                            f"data.batch_size x processes = {global_batch}; lower data.batch_size or add "
                            "examples")
        self.fingerprint = _fingerprint(rows)
        self.step = 0
        self.skips: list[tuple[int, int]] = []

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def batch_at(self, step: int) -> tuple[torch.Tensor, ...]:
        epoch, k = divmod(step, self.per_epoch)
        start = (k * self.world_size + self.rank) * self.batch_size
        picked = self._order(epoch)[start:start + self.batch_size]
        return collate([self.rows[i] for i in picked], self.pad_id, self.packed, self.device)

    def _skip_forward(self, step: int) -> int:
        moved = True
        while moved:
            moved = False
            for a, b in self.skips:
                if a <= step < b:
                    step, moved = b, True
        return step

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        self.step = self._skip_forward(self.step)
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def skip(self, start_step: int, end_step: int) -> None:
        """Never produce batches start_step .. end_step-1 (a spike guard's rollback)."""
        self.skips = sorted({*self.skips, (int(start_step), int(end_step))})

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "rows": len(self.rows),
                "global_batch": self.batch_size * self.world_size, "fingerprint": self.fingerprint,
                "skips": [list(s) for s in self.skips]}

    def load_state_dict(self, state: dict) -> None:
        ours = self.state_dict()
        for key in ("seed", "rows", "global_batch", "fingerprint"):
            if state.get(key) != ours[key]:
                raise DataError(f"the checkpoint's SFT batch state has {key}={state.get(key)!r} but this run "
                                f"has {ours[key]!r}; resume with the same data, data.* settings, tokenizer "
                                "and batch_size x processes")
        self.step = int(state["step"])
        self.skips = sorted((int(a), int(b)) for a, b in state.get("skips", []))


def eval_batches(rows: Sequence[Row], batch_size: int, pad_id: int, packed: bool, max_batches: int | None,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, ...]]:
    """The held-out rows in order, batch_size at a time (at most max_batches batches)."""
    starts = range(0, len(rows), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    for i in starts:
        yield collate(rows[i:i + batch_size], pad_id, packed, device)


@dataclass
class EvalSet:
    """Held-out rows and how to batch them for SFTObjective.evaluate."""

    rows: list[Row]
    batch_size: int
    pad_id: int
    packed: bool
    max_batches: NonNegativeInt | None = None
    device: torch.device | str = "cpu"


class SFTObjective(Objective):
    """Masked next-token loss: sum over kept (assistant) tokens, weight = their count; val_loss is the
    token-weighted held-out loss."""

    name = "sft"
    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, val: EvalSet | None = None):
        self.val = val

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> LossOutput:
        return next_token_loss(model, *batch, ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.val is None or not self.val.rows:
            return {}
        v = self.val
        total, kept = 0.0, 0
        for batch in eval_batches(v.rows, v.batch_size, v.pad_id, v.packed, v.max_batches, v.device):
            out = self.loss(model, batch)
            total += float(out.loss_sum)
            kept += int(out.weight)
        return {"val_loss": total / kept}


def sft_objective(val: EvalSet | None = None) -> SFTObjective:
    """The SFT objective for llmlab.train's Trainer (held-out loss from `val` when given)."""
    return SFTObjective(val)


# ---------------------------------------------------------------- the run: config, data, model

@dataclass
class SFTDataConfig:
    train: NonEmptyStr = "data/sft/train.jsonl"  # JSONL/Parquet: {"messages"} or {"prompt", "completion"}
    val: str = ""                  # held-out file of the same kind; "" holds back val_fraction of data.train
    val_fraction: Fraction = 0.05  # share of data.train held out when data.val is "" (at least 1 example)
    packing: bool = True           # pack examples into rows (segment ids) instead of one padded example a row
    block_size: PositiveInt | None = None  # tokens per row; longer examples are cut; None -> model.block_size
    batch_size: PositiveInt = 8    # rows per micro-batch (per process)
    seed: NonNegativeInt = 0       # order of the examples and rows
    tokenizer: str = ""            # "" -> the checkpoint's tokenizer/ copy


@dataclass
class SFTConfig:
    checkpoint: str = ""           # the model to fine-tune: a ckpt-STEP directory or an import-hf'd one
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=10,
                                                                   max_steps=300))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="sft", eval_every=50,
                                                                   ckpt_every=100))
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class SFTData:
    """Everything read and encoded before training: the rows and what was done to the examples."""

    added: list[str]               # special tokens with_chat_tokens added
    train_rows: list[Row]
    val_rows: list[Row]
    pad_id: int
    examples: int                  # training examples kept
    dropped: int                   # examples with nothing left to learn after cutting to block_size


def load_tokenizer(cfg: SFTConfig) -> Tokenizer:
    """data.tokenizer, else the checkpoint's tokenizer/ copy (CheckpointError when there is none)."""
    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.checkpoint) / "tokenizer"
    if not path.is_dir():
        if cfg.data.tokenizer:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not a directory; point it at a saved "
                              "tokenizer, or set it to \"\" to use the checkpoint's")
        raise CheckpointError(f"checkpoint {cfg.checkpoint} has no tokenizer/ directory; pass "
                              "data.tokenizer=DIR (the tokenizer the model was trained with)")
    return Tokenizer.load(path)


def _encode_file(tok: Tokenizer, examples: list[SFTExample], block_size: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    return encode_examples([encode_sft(tok, ex) for ex in examples], block_size)


def prepare_data(cfg: SFTConfig, tok: Tokenizer, block_size: int) -> SFTData:
    """Read data.train (and data.val), encode with the chat template, cut, split, pack or pad."""
    chat_tok, added = with_chat_tokens(tok)
    d = cfg.data
    train = read_sft(d.train)
    if d.val:
        val = read_sft(d.val)
    else:  # hold back a seeded share of the training examples
        order = np.random.default_rng([d.seed, 1]).permutation(len(train))
        n_val = max(1, round(d.val_fraction * len(train))) if d.val_fraction > 0 else 0
        if n_val >= len(train):
            raise DataError(f"{d.train} has {len(train)} example(s): too few to hold some out for val_loss; "
                            "add examples, pass data.val=FILE, or set data.val_fraction=0")
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    train_xy = _encode_file(chat_tok, train, block_size)
    val_xy = _encode_file(chat_tok, val, block_size)
    if not train_xy:
        raise DataError(f"{d.train}: no example has an assistant token within the first {block_size} tokens; "
                        "raise data.block_size or check the data")
    pad_id = chat_tok.chat_template.pad_id
    rows = make_rows(train_xy, block_size, d.packing, d.seed)
    val_rows = pack_rows(val_xy, block_size) if d.packing else pad_rows(val_xy)
    return SFTData(added, rows, val_rows, pad_id, len(train_xy), len(train) - len(train_xy))


def resolve_config(cfg: SFTConfig) -> SFTConfig:
    """Check every value and fill data.block_size from the checkpoint's model; nothing is written."""
    cfg = with_start_block_size(check_config(cfg),
                                "a ckpt-STEP directory, or one written by llmlab import-hf", "fine-tune")
    refuse_lora_with_fsdp(cfg)
    return cfg


def with_start_block_size(cfg, kinds: str, verb: str):
    """cfg (with .checkpoint and .data.block_size) with data.block_size filled from the starting checkpoint's
    model, which must be a full model (not LoRA adapters) that a block this long fits; nothing is written.
    `kinds` names the checkpoints a run starts from and `verb` what it does with one, for the messages."""
    if not cfg.checkpoint:
        raise ConfigError(f"checkpoint is not set; pass --checkpoint CKPT ({kinds})")
    path = Path(cfg.checkpoint)
    meta = read_meta(path)  # CheckpointError naming the directory when it is missing or broken
    if META_KEY in meta:
        raise CheckpointError(f"checkpoint {path} holds LoRA adapters only; {verb} its merged model "
                              "(RUN_DIR/merged of that run) instead")
    refuse_extensions(path, meta)
    model = config_from_meta(meta, path / CONFIG_FILE)
    block = cfg.data.block_size or model.block_size
    if block > model.block_size:
        raise ConfigError(f"data.block_size={block} is longer than the checkpoint's block_size "
                          f"{model.block_size}; lower data.block_size or leave it unset")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, block_size=block))


def refuse_lora_with_fsdp(cfg) -> None:
    """ConfigError for LoRA under FSDP2 (cfg has .lora and .parallel): adapters are not sharded."""
    if cfg.lora.enabled and cfg.parallel.resolved_strategy(world()[1]) == "fsdp":
        raise ConfigError("lora.rank > 0 with parallel.strategy=fsdp is not supported; use "
                          "parallel.strategy=ddp (adapters are small) or full fine-tuning (lora.rank=0)")


def load_model(checkpoint: str | Path, tok: Tokenizer, device: torch.device | str = "cpu"
               ) -> tuple[Transformer, Tokenizer, str | None]:
    """The checkpoint's model in fp32 with rows for the chat tokens its tokenizer lacks (add_chat_tokens:
    deterministic, so a resumed run and load_lora rebuild the same base); returns (model, chat tokenizer,
    the one-line message saying what was added, or None)."""
    model = Transformer.load(checkpoint, device=device, dtype="fp32")
    return add_chat_tokens(model, tok)


def _check_tokenizer(cfg: SFTConfig, tok: Tokenizer) -> None:
    """A data.tokenizer must be the checkpoint's own (the model's ids mean its tokens)."""
    if not cfg.data.tokenizer:
        return
    model_cfg = read_config(Path(cfg.checkpoint))
    require_same_tokenizer(checkpoint_tokenizer(cfg.checkpoint, model_cfg.vocab_size),
                           directory_tokenizer(cfg.data.tokenizer, tok),
                           "point data.tokenizer at the tokenizer the checkpoint was trained with, or "
                           "drop it")


def write_merged(run_dir: Path, final: Path, tok: Tokenizer, chat_tok: Tokenizer) -> Path:
    """RUN_DIR/merged: the adapters of checkpoint `final` folded into their base, a plain checkpoint (with the
    chat tokenizer) that every verb reads."""
    model = load_lora(final, merge=True, base_loader=lambda base, meta: load_model(base, tok)[0])
    target = run_dir / "merged"
    with atomic_dir(target) as tmp:
        model.save_into(tmp)
        chat_tok.save(tmp / "tokenizer")
        write_tokenizer_id(tmp, fingerprint(chat_tok))
    return target


def run_sft(cfg: SFTConfig, resume: str | None = None, say=None) -> dict[str, Any]:
    """Fine-tune cfg.checkpoint on cfg.data on the shared launcher (resume: a checkpoint, a run dir, "auto" or
    "best"); returns the run's summary. `say(line)` receives the one-line notes (chat tokens added, examples
    left out)."""
    cfg = check_config(cfg)  # bad values are reported before anything runs
    say = say or (lambda line: None)

    def resolve(cfg: SFTConfig) -> Plan:
        cfg = resolve_config(cfg)
        return Plan(cfg, inputs=[cfg.checkpoint, cfg.data.train, cfg.data.val, cfg.data.tokenizer])

    def build(run: Run) -> Built:
        cfg, d = run.config, run.config.data
        tok = load_tokenizer(cfg)
        _check_tokenizer(cfg, tok)
        data = prepare_data(cfg, tok, d.block_size)
        model, chat_tok, message = load_model(cfg.checkpoint, tok, run.device)
        notes = [message] if message else []
        if message and cfg.lora.enabled:
            notes.append("with LoRA the new tokens' embedding rows stay frozen at their shared initial "
                         "value (the mean row); fine-tune fully once (lora.rank=0) to let the model tell "
                         "them apart")
        if data.dropped:
            notes.append(f"{data.dropped} example(s) of {d.train} have no assistant token within "
                         f"data.block_size={d.block_size} tokens and were left out")
        for line in notes if run.rank == 0 else []:
            say(f"llmlab sft: {line}")
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora)
        batches = SFTBatches(data.train_rows, d.batch_size, pad_id=data.pad_id, packed=d.packing,
                             seed=d.seed, rank=run.rank, world_size=run.world_size, device=run.device,
                             source=d.train)
        objective = sft_objective(EvalSet(data.val_rows, d.batch_size, data.pad_id, d.packing,
                                          cfg.train.eval_batches, run.device))
        summary = {"examples": data.examples, "dropped": data.dropped, "val_rows": len(data.val_rows),
                   "added_tokens": data.added}
        checkpointer, finish = None, None
        if cfg.lora.enabled:
            checkpointer = functools.partial(LoRACheckpointer, base=cfg.checkpoint)
            if cfg.lora.merge:
                def finish(trainer, summary):
                    if trainer.is_main:
                        final = trainer.checkpointer.path(trainer.step)
                        summary["merged"] = str(write_merged(run.run_dir, final, tok, chat_tok))
        return Built(model, objective, batches, flops_per_token=model.flops_per_token(d.block_size),
                     tokenizer=chat_tok, checkpointer=checkpointer, summary=summary, finish=finish)

    return launch(cfg, build, resume, resolve=resolve)
