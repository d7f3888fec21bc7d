"""The in-training val estimate reads windows spread over the whole split, not its first batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.data.loader import TokenLoader
from llmlab.data.shards import write_shard_dir
from llmlab.train.pretrain import make_eval


def _shards(tmp_path, val: np.ndarray, vocab: int = 16):
    out = tmp_path / "shards"
    write_shard_dir(out, {"train": [np.arange(400) % vocab], "val": [val]}, vocab_size=vocab, eos_id=0)
    return out


def test_eval_windows_cover_the_split_evenly(tmp_path):
    loader = TokenLoader(_shards(tmp_path, np.arange(1001), vocab=2000), block_size=10, batch_size=4)
    assert loader.val_windows == 100
    starts = loader.eval_windows(max_batches=5)  # 20 of 100 windows: one from the middle of each fifth
    assert starts == [10 * (5 * i + 2) for i in range(20)]
    assert loader.eval_windows(max_batches=5) == starts  # the same windows every time
    assert loader.eval_windows(max_batches=25) == loader.eval_windows() == list(range(0, 1000, 10))
    # Every tenth of the split holds the same number of evaluated windows.
    assert np.bincount(np.array(starts) // 100, minlength=10).tolist() == [2] * 10
    batches = list(loader.iter_eval(5, spread=True))
    assert [int(x[0, 0]) for x, _ in batches] == starts[::4]
    # A cap past the split reads all of it, including a last partial batch.
    assert sum(len(x) for x, _ in loader.iter_eval(30, spread=True)) == 100


class _LikesOnes(torch.nn.Module):
    """Predicts token 1 with high probability everywhere: cheap on runs of 1s, costly on anything else."""

    def __init__(self, vocab: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.full((vocab,), -4.0).index_fill(0, torch.tensor([1]), 4.0))

    def forward(self, x):
        return self.bias.expand(*x.shape, -1)


def test_estimate_is_unbiased_where_the_split_starts_unlike_its_end(tmp_path):
    # As on the demo: the val split's first documents differ in kind from the rest.
    rng = np.random.default_rng(0)
    val = np.concatenate([np.ones(600, dtype=np.int64), rng.integers(2, 16, 1401)])
    loader = TokenLoader(_shards(tmp_path, val), block_size=10, batch_size=4)
    model = _LikesOnes(16)
    whole = make_eval(loader, 10**6)(model)
    assert whole["val_coverage"] == 1.0
    spread = make_eval(loader, 10)(model)   # 40 of 200 windows
    assert spread["val_coverage"] == pytest.approx(0.2)
    first = [torch.nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1)).item()
             for x, y in loader.iter_eval(10)]  # the old estimate: the first 10 batches, all 1s
    assert np.mean(first) < 0.01 < whole["val_loss"] / 2
    assert spread["val_loss"] == pytest.approx(whole["val_loss"], rel=0.05)
