"""Preference pairs as token ids and as deterministic, resumable, rank-aware micro-batches.

Shared by the reward model and DPO: both read {"prompt", "chosen", "rejected"} records
(llmlab.data.chat_data), render them with the chat template, and look at the two full sequences
prompt + chosen and prompt + rejected.

A micro-batch of B pairs holds 2B sequences, numbered as TRL orders them: 0..B-1 the chosen ones, B..2B-1 the
rejected ones of the same pairs. They sit in rows of `input_ids` [R, L], right-padded:
    padded   one sequence per row (R = 2B), like TRL's batches;
    packed   several sequences to a row, each its own segment (`segment_ids` [R, L]: the model attends
             within a segment and restarts positions there), rows as wide as the longest sequence (see
             layout), so little compute goes to padding. Both give the same numbers.
Per sequence: `lengths`, `prompt_lengths`, `seq_row`, `seq_start` (where it sits); per target position
(predicting token t + 1 from position t, [R, L-1]): `owner`, the sequence whose completion that target
belongs to (2B: none). completion_logps() sums per-token log-probs by owner; last_token_values() reads a
[R, L] output at each sequence's last token (a reward model's score). "n_pairs" is B.

Per-pair extras (a margin from the data, DPO's reference log-probs) travel with the pairs, so whatever is
computed once up front is stored with the data and batched with it.

The pair stream: epoch e visits the N pairs in a permutation drawn from (seed, e); concatenating epochs gives
one endless stream, and the micro-batch at loader step s on rank r holds stream entries [s*G + r*B, s*G +
(r+1)*B) with G = B * world_size. So a batch is a pure function of (seed, step, rank, world_size), ranks read
disjoint pairs, and resuming is exact: restore `step` (state_dict) and the next batch is the one the
original run would have drawn (shuffle=False: the pairs in file order, epoch after epoch). `skip(a, b)`
drops steps a..b-1 (a loss-spike rollback), kept across resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmlab.align.sft import load_model, load_tokenizer, with_start_block_size
from llmlab.config import Fraction, NonEmptyStr, NonNegativeInt, PositiveInt, check_config
from llmlab.data.chat_data import encode_preference, read_preferences
from llmlab.errors import DataError
from llmlab.model.transformer import (
    Transformer,
    read_config,
)
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer

STATE_VERSION = 1


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one preference pair: the shared prompt and the two completions (end of turn included)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairDataConfig:
    """Where the preference pairs come from and how they are batched (reward model and DPO alike)."""

    train: NonEmptyStr = "data/preferences/train.jsonl"  # JSONL/Parquet {"prompt", "chosen", "rejected"}
    val: str = ""                  # held-out pairs; "" holds back val_fraction of data.train
    val_fraction: Fraction = 0.05  # share of data.train held out when data.val is "" (at least 1 pair)
    packing: bool = True           # pack sequences into rows (segment ids), not one padded sequence a row
    block_size: PositiveInt | None = None  # longest sequence (prompt + answer); longer pairs are left out;
                                   # None -> model.block_size
    batch_size: PositiveInt = 8    # pairs per micro-batch (per process)
    seed: NonNegativeInt = 0       # order of the pairs, and which are held out
    tokenizer: str = ""            # "" -> the checkpoint's tokenizer/ copy


@dataclass
class PairData:
    """The encoded training and held-out pairs, with per-pair margins where the records give them."""

    train: list[EncodedPair]
    val: list[EncodedPair]
    train_margin: torch.Tensor | None
    val_margin: torch.Tensor | None
    dropped: int                   # pairs longer than data.block_size, left out


def _margins(pairs: Sequence, source: str) -> torch.Tensor | None:
    """The records' "margin" fields as a tensor when every record has one, None when none has."""
    values = [p.extra.get("margin") for p in pairs]
    if all(v is None for v in values):
        return None
    for p, v in zip(pairs, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise DataError(f"{p.where or source}: field margin is {v!r}; give every record of {source} a "
                            "finite number as margin, or none of them")
    return torch.tensor(values, dtype=torch.float32)


def prepare_pairs(cfg: PairDataConfig, tok, block_size: int) -> PairData:
    """Read data.train (and data.val, or hold back a seeded share of data.train) and encode with the chat
    template of `tok`; pairs with a sequence longer than block_size are left out."""
    records = read_preferences(cfg.train)
    if cfg.val:
        train_records, val_records = records, read_preferences(cfg.val)
    else:
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(records))
        n_val = max(1, round(cfg.val_fraction * len(records))) if cfg.val_fraction > 0 else 0
        if n_val >= len(records):
            raise DataError(f"{cfg.train} has {len(records)} pair(s): too few to hold some out; add pairs, "
                            "pass data.val=FILE, or set data.val_fraction=0")
        val_records = [records[i] for i in sorted(order[:n_val])]
        train_records = [records[i] for i in sorted(order[n_val:])]
    train, kept = encode_pairs(tok, train_records, block_size, cfg.train)
    val, kept_val = encode_pairs(tok, val_records, block_size, cfg.val or cfg.train) if val_records \
        else ([], [])
    dropped = len(train_records) + len(val_records) - len(kept) - len(kept_val)
    return PairData(train, val, _margins(kept, cfg.train), _margins(kept_val, cfg.val or cfg.train), dropped)


def encode_pairs(tok, pairs: Sequence, max_length: int, source: str) -> tuple[list[EncodedPair], list]:
    """Render each PreferencePair with the chat template; pairs whose longer sequence exceeds max_length are
    left out (a cut sequence would lose its end-of-turn token, where the reward is read). Returns the
    encoded pairs and the records they came from; DataError when none is left."""
    encoded, kept = [], []
    for pair in pairs:
        item = EncodedPair(*(tuple(ids) for ids in encode_preference(tok, pair)))
        if item.longest() <= max_length:
            encoded.append(item)
            kept.append(pair)
    if not encoded:
        raise DataError(f"{source}: all {len(pairs)} pairs are longer than {max_length} tokens; use a model "
                        "with a longer context or shorter records")
    return encoded, kept


def fingerprint(pairs: Sequence[EncodedPair]) -> str:
    """A short hash of the pairs' ids, so a resumed run can tell that its data changed."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def layout(lengths: Sequence[int], packed: bool) -> list[list[int]]:
    """Which sequences share a row. Padded: one per row. Packed: first-fit decreasing into rows as wide as the
    longest sequence, so rows are no wider than padding would make them (attention costs the square of a
    row's width) and there are fewer of them (the linear layers cost each position of a row)."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    width = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def collate(pairs: Sequence[EncodedPair], extras: dict[str, torch.Tensor] | None = None,
            index: Sequence[int] | None = None, pad_id: int = 0, device: torch.device | str = "cpu",
            packed: bool = False) -> dict:
    """The batch of `pairs` (see the module docstring); extras[k][index] ride along."""
    n = len(pairs)
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lengths = np.array([len(p.prompt) for p in pairs] * 2, dtype=np.int64)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    rows = layout(lengths.tolist(), packed)
    width = max(int(lengths[r].sum()) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    owner = np.full((len(rows), width - 1), 2 * n, dtype=np.int64)  # 2n: no sequence's completion target
    seq_row, seq_start = np.zeros(2 * n, dtype=np.int64), np.zeros(2 * n, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            end = at + lengths[i]
            ids[r, at:end] = seqs[i]
            segments[r, at:end] = k
            # target position t predicts token t + 1: the completion's tokens are predicted from
            # positions at + prompt_length - 1 .. end - 2
            owner[r, at + prompt_lengths[i] - 1:end - 1] = i
            seq_row[i], seq_start[i] = r, at
            at = end
        segments[r, at:] = len(members)  # padding: a segment of its own
    batch = {name: torch.from_numpy(a).to(device) for name, a in (
        ("input_ids", ids), ("lengths", lengths), ("prompt_lengths", prompt_lengths), ("owner", owner),
        ("seq_row", seq_row), ("seq_start", seq_start))}
    if packed:
        batch["segment_ids"] = torch.from_numpy(segments).to(device)
    batch["n_pairs"] = n
    for key, values in (extras or {}).items():
        batch[key] = values[torch.as_tensor(list(index))].to(device)
    return batch


def completion_logps(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """[2B]: each sequence's summed log-probs over its completion, from per-target log-probs [R, L-1]."""
    n = 2 * batch["n_pairs"]
    sums = per_token.new_zeros(n + 1)
    return sums.index_add(0, batch["owner"].flatten(), per_token.flatten())[:n]


def completion_lengths(batch: dict) -> torch.Tensor:
    """[2B]: completion tokens of each sequence."""
    return batch["lengths"] - batch["prompt_lengths"]


def last_token_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """[2B]: values [R, L] at each sequence's last token (its last non-pad token)."""
    flat = batch["seq_row"] * values.shape[1] + batch["seq_start"] + batch["lengths"] - 1
    return values.flatten()[flat]


class PairBatches:
    """Micro-batches of `batch_size` pairs from `pairs` (see the module docstring for the stream)."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", pad_id: int = 0,
                 extras: dict[str, torch.Tensor] | None = None, packed: bool = False, shuffle: bool = True):
        if not pairs:
            raise DataError("no preference pairs to train on; give a file with at least one record")
        self.pairs, self.batch_size = list(pairs), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device, self.pad_id = torch.device(device), pad_id
        self.packed, self.shuffle = packed, shuffle
        self.extras = dict(extras or {})
        self.fingerprint = fingerprint(self.pairs)
        self.step = 0
        self.skips: list[tuple[int, int]] = []
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _entry(self, j: int) -> int:
        """The pair index at position j of the endless stream."""
        epoch, k = divmod(j, len(self.pairs))
        if not self.shuffle:
            return k
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return int(self._perm[1][k])

    def indices_at(self, step: int) -> list[int]:
        first = step * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self._entry(j) for j in range(first, first + self.batch_size)]

    def batch_of(self, index: Sequence[int]) -> dict:
        return collate([self.pairs[i] for i in index], self.extras, index, self.pad_id, self.device,
                       self.packed)

    def _skip_forward(self, step: int) -> int:
        moved = True
        while moved:  # ranges may chain: [3, 5) then [5, 8)
            moved = False
            for start, end in self.skips:
                if start <= step < end:
                    step, moved = end, True
        return step

    def next_batch(self) -> dict:
        self.step = self._skip_forward(self.step)
        batch = self.batch_of(self.indices_at(self.step))
        self.step += 1
        return batch

    def iter_all(self, max_batches: int | None = None) -> Iterator[tuple[list[int], dict]]:
        """(indices, batch) over the pairs in order, once (at most max_batches batches): evaluation and
        reference log-probs."""
        starts = range(0, len(self.pairs), self.batch_size)
        for start in starts if max_batches is None else starts[:max_batches]:
            index = list(range(start, min(start + self.batch_size, len(self.pairs))))
            yield index, self.batch_of(index)

    def skip(self, start_step: int, end_step: int) -> None:
        if not 0 <= start_step < end_step:
            raise ValueError(f"skip range must satisfy 0 <= start < end, got [{start_step}, {end_step})")
        self.skips = sorted({*self.skips, (int(start_step), int(end_step))})

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed if self.shuffle else None,
                "pairs": len(self.pairs),
                "global_batch": self.batch_size * self.world_size, "fingerprint": self.fingerprint,
                "skips": [list(s) for s in self.skips]}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        for key in ("seed", "pairs", "global_batch", "fingerprint"):
            if state.get(key) != expected[key]:
                raise DataError(f"the checkpoint's pair loader has {key}={state.get(key)!r} but this run has "
                                f"{expected[key]!r}; resume with the same preference data, seed and "
                                "batch_size x world_size")
        self.step = int(state["step"])
        self.skips = sorted((int(a), int(b)) for a, b in state.get("skips", []))


# ----- what a reward or DPO run shares: the checkpoint, the tokenizer, the pairs -----
def resolve_pair_config(cfg):
    """Check every value of a reward/DPO config and fill data.block_size from the checkpoint's model;
    nothing is written. (cfg has .checkpoint and .data: PairDataConfig.)"""
    return with_start_block_size(check_config(cfg), "an SFT checkpoint, or any ckpt-STEP or import-hf "
                                 "directory", "start from")


def load_start(cfg, device: torch.device | str = "cpu", say=None):
    """(model, chat tokenizer, PairData) of a reward/DPO run: the checkpoint's model in fp32 with rows for
    any chat tokens its tokenizer lacked, and the pairs encoded with that tokenizer. `say` gets one line per
    note (tokens added, pairs left out)."""
    tok = load_tokenizer(cfg)
    if cfg.data.tokenizer:  # it must be the checkpoint's own: the model's ids mean its tokens
        vocab = read_config(Path(cfg.checkpoint)).vocab_size
        require_same_tokenizer(checkpoint_tokenizer(cfg.checkpoint, vocab),
                               directory_tokenizer(cfg.data.tokenizer, tok),
                               "point data.tokenizer at the tokenizer the checkpoint was trained with, or "
                               "drop it")
    model, chat_tok, message = load_model(cfg.checkpoint, tok, device)
    model = without_dropout(model)
    data = prepare_pairs(cfg.data, chat_tok, cfg.data.block_size)
    notes = [message] if message else []
    if data.dropped:
        notes.append(f"{data.dropped} pair(s) have a sequence longer than data.block_size="
                     f"{cfg.data.block_size} tokens and were left out")
    for line in notes:
        (say or (lambda _: None))(line)
    return model, chat_tok, data


def without_dropout(model: Transformer) -> Transformer:
    """The model with dropout 0 (TRL's disable_dropout, on by default for its reward and DPO trainers): a
    pairwise loss compares two forward passes, and DPO compares them with a reference computed without
    dropout, so random masks would only add noise to the differences it learns from."""
    if not model.config.dropout:
        return model
    plain = Transformer(dataclasses.replace(model.config, dropout=0.0)).to(next(model.parameters()).device)
    plain.load_state_dict(model.state_dict())
    return plain


def pair_batches(pairs: Sequence[EncodedPair], cfg: PairDataConfig, pad_id: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", margin: torch.Tensor | None = None,
                 shuffle: bool = True) -> PairBatches:
    """PairBatches of `pairs` with the data config's batch size, packing and seed (held-out: shuffle=False,
    rank 0 of 1)."""
    extras = {"margin": margin} if margin is not None else None
    return PairBatches(pairs, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                       device=device, pad_id=pad_id, extras=extras, packed=cfg.packing, shuffle=shuffle)
