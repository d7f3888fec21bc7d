"""TokenLoader: deterministic, resumable, rank-aware batches of token windows from prepared shards.

The shards of a split are memory-mapped and read as one concatenated stream of N tokens (windows may cross
a shard boundary: shards end at document boundaries, so crossing one is no different from crossing the
eos token between two documents).

Windows. A training example is a window of block_size+1 contiguous tokens; x is its first T = block_size
tokens and y the last T (x shifted by one). Within an epoch the windows tile the stream with stride T:
window k starts at shift_e + k*T, so consecutive windows share exactly one token (the label of one is the
first input of the next) and no token is an input twice. Epoch 0 has shift 0; later epochs draw a shift
in [0, T) from (seed, epoch) so a multi-epoch run does not always cut the text at the same places. Each
epoch visits its windows in a permutation drawn from (seed, epoch).

The window stream. Concatenating the epochs' permuted windows gives one infinite sequence w_0, w_1, ...
that depends only on (seed, N, T). With global batch G = batch_size * world_size, the batch at loader
step s on rank r is windows w_j for j in [s*G + r*B, s*G + (r+1)*B). So the batch is a pure function
of (seed, step, rank, world_size); the ranks of one step read disjoint windows; and their union, in rank
order, is exactly the batch a single process with batch_size B*world_size gets at step s, or
equivalently the micro-batches s*world_size + 0 ... s*world_size + world_size-1 of a single process with
batch_size B (which is how a gradient-accumulation run reproduces a DDP run).

Position and skipping. `step` is the index in that stream of the next batch to produce. `skip(a, b)`
records that batches a..b-1 must never be produced (a loss-spike rollback skips the data that caused the
spike); reaching a skipped range jumps `step` to its end. Skips live in `state_dict()`, so a resumed run
keeps skipping. Because batches are addressed by step, resuming is exact: restore the state dict and the
next batch is the one the original run would have produced.

Evaluation. `iter_eval(max_batches)` walks the val split's windows in order (stride T from token 0) and
is independent of the training position. With spread=True a capped evaluation takes windows spread evenly
over the whole split instead of its first ones (the same windows every time), so an in-training estimate is
not biased towards the documents at the start of the split; where the cap covers the split it is all of it.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmlab.data.shards import read_meta, read_shard, split_shards
from llmlab.errors import DataError

STATE_VERSION = 1


class _TokenStream:
    """Several memory-mapped shards read as one array of tokens (each body checked: ids below vocab_size)."""

    def __init__(self, paths: list[Path], vocab_size: int):
        self.shards = [read_shard(p, vocab_size) for p in paths]
        sizes = [len(s) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self.num_tokens = self.starts[-1]

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start+length) into `out` (1-D int64), crossing shard boundaries as needed."""
        i = bisect.bisect_right(self.starts, start) - 1
        filled = 0
        while filled < length:
            local = start + filled - self.starts[i]
            take = min(length - filled, len(self.shards[i]) - local)
            out[filled:filled + take] = self.shards[i][local:local + take]
            filled += take
            i += 1

    def windows(self, starts: list[int], length: int) -> np.ndarray:
        batch = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            self.read(start, length, batch[row])
        return batch


def _to_xy(batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(batch)
    if device.type == "cuda":
        data = data.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        data = data.to(device)
    return data[:, :-1], data[:, 1:]


def _window_count(num_tokens: int, block_size: int, shift: int = 0) -> int:
    return (num_tokens - 1 - shift) // block_size


class TokenLoader:
    """Batches (x, y) of shape [batch_size, block_size] from `shard_dir`'s `split` (see module docstring)."""

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train", block_size: int = 1024,
                 batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size and batch_size must be >= 1 (got {block_size}, {batch_size})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}; launch with torchrun or "
                            f"fix them")
        self.shard_dir = Path(shard_dir)
        self.meta = read_meta(self.shard_dir)
        self.split, self.block_size, self.batch_size = split, int(block_size), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device)
        self.stream = self._open(split)
        self.num_tokens = self.stream.num_tokens
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.eos_id = self.meta["tokenizer"].get("eos_id")
        self.step = 0
        self.skips: list[tuple[int, int]] = []
        self._epoch_starts = [0]  # global window index at which each epoch begins (grown lazily)
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._shifts: dict[int, int] = {}
        self._val: _TokenStream | None = self.stream if split == "val" else None

    # ---- the window stream ----

    def _open(self, split: str) -> _TokenStream:
        stream = _TokenStream(split_shards(self.shard_dir, split, self.meta),
                              self.meta["tokenizer"]["vocab_size"])
        if stream.num_tokens < self.block_size + 1:
            raise DataError(f"block_size {self.block_size} needs at least {self.block_size + 1} tokens but "
                            f"the {split} split of {self.shard_dir} has {stream.num_tokens}; use a smaller "
                            f"block_size "
                            f"or prepare more text (a larger --val-fraction for val)")
        return stream

    def _shift(self, epoch: int) -> int:
        if epoch not in self._shifts:
            max_shift = min(self.block_size - 1, self.num_tokens - 1 - self.block_size)
            rng = np.random.default_rng([self.seed, epoch, 1])
            self._shifts[epoch] = 0 if epoch == 0 else int(rng.integers(0, max_shift + 1))
        return self._shifts[epoch]

    @property
    def windows_per_epoch(self) -> int:
        """Windows in epoch 0 (later epochs, shifted, may have one fewer)."""
        return _window_count(self.num_tokens, self.block_size)

    def _locate(self, j: int) -> tuple[int, int]:
        """Map global window index j to (epoch, index within that epoch)."""
        while self._epoch_starts[-1] <= j:
            epoch = len(self._epoch_starts) - 1
            count = _window_count(self.num_tokens, self.block_size, self._shift(epoch))
            self._epoch_starts.append(self._epoch_starts[-1] + count)
        epoch = bisect.bisect_right(self._epoch_starts, j) - 1
        return epoch, j - self._epoch_starts[epoch]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            count = _window_count(self.num_tokens, self.block_size, self._shift(epoch))
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(count))
        return self._perm_cache[1]

    def window_starts(self, step: int) -> list[int]:
        """Token offsets of the windows this rank reads at `step` (a pure function of seed, step, rank)."""
        first = step * self.batch_size * self.world_size + self.rank * self.batch_size
        starts = []
        for j in range(first, first + self.batch_size):
            epoch, k = self._locate(j)
            starts.append(self._shift(epoch) + int(self._permutation(epoch)[k]) * self.block_size)
        return starts

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `step` without moving the loader (ignores skips)."""
        return _to_xy(self.stream.windows(self.window_starts(step), self.block_size + 1), self.device)

    # ---- the training position ----

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first window."""
        return self._locate(self._skip_forward(self.step) * self.batch_size * self.world_size)[0]

    def _skip_forward(self, step: int) -> int:
        moved = True
        while moved:  # ranges may chain: [3,5) then [5,8)
            moved = False
            for start, end in self.skips:
                if start <= step < end:
                    step, moved = end, True
        return step

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current step (jumping over skipped ranges); advances the step by one."""
        self.step = self._skip_forward(self.step)
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def skip(self, start_step: int, end_step: int) -> None:
        """Never produce batches start_step .. end_step-1 (kept in the state dict across resumes)."""
        start_step, end_step = int(start_step), int(end_step)
        if not 0 <= start_step < end_step:
            raise ValueError(f"skip range must satisfy 0 <= start < end, got [{start_step}, {end_step})")
        self.skips = sorted({*self.skips, (start_step, end_step)})

    def state_dict(self) -> dict:
        """Plain ints/strings/lists only, so it loads with torch.load(weights_only=True)."""
        return {"version": STATE_VERSION, "split": self.split, "step": self.step, "seed": self.seed,
                "block_size": self.block_size, "global_batch": self.batch_size * self.world_size,
                "num_tokens": self.num_tokens, "fingerprint": self.meta["fingerprint"],
                "skips": [list(s) for s in self.skips]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by state_dict() (from any rank of a run with the same global batch)."""
        expected = self.state_dict()
        for key in ("split", "seed", "block_size", "global_batch", "num_tokens", "fingerprint"):
            if state.get(key) != expected[key]:
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                f"{expected[key]!r} ({self.shard_dir}); resume with the same shards, seed, "
                                f"block_size and batch_size x world_size")
        self.step = int(state["step"])
        self.skips = sorted((int(a), int(b)) for a, b in state.get("skips", []))

    # ---- evaluation ----

    @property
    def val_windows(self) -> int:
        """Windows of the val split (stride block_size from token 0)."""
        if self._val is None:
            self._val = self._open("val")
        return _window_count(self._val.num_tokens, self.block_size)

    def eval_windows(self, max_batches: int | None = None) -> list[int]:
        """Token offsets of the val windows an evaluation of at most `max_batches` batches reads, in order.

        None, or a cap that covers the split, gives every window. Otherwise window i of the n read is the
        middle of the i-th of n equal slices of the split (k = floor((i + 1/2) * count / n)), so each part of
        the split is represented in proportion to its length, and the choice never changes between calls.
        """
        count = self.val_windows
        n = count if max_batches is None else min(count, max_batches * self.batch_size)
        picked = range(count) if n == count else (int((i + 0.5) * count / n) for i in range(n))
        return [k * self.block_size for k in picked]

    def iter_eval(self, max_batches: int | None = None, partition: bool = False,
                  spread: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over the val split's windows in order (stride block_size from token 0).

        Only full batches are produced, except that a val split smaller than one batch gives one smaller
        batch. `max_batches` caps the count: the first batches, or with spread=True batches of windows
        spread evenly over the whole split (see eval_windows; these keep a last partial batch, so a cap
        that covers the split reads all of it). By default every rank gets the same batches; with
        partition=True rank r gets batches r, r + world_size, ... of that sequence (average across ranks).
        """
        starts = self.eval_windows(max_batches if spread else None)
        count = len(starts)
        batches = [starts[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        if not spread and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        if max_batches is not None:
            batches = batches[:max_batches]
        if partition:
            batches = batches[self.rank::self.world_size]
        for batch_starts in batches:
            yield _to_xy(self._val.windows(batch_starts, self.block_size + 1), self.device)
