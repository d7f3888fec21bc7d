"""TokenLoader: windows hold the right tokens, the batch at a step is a pure function of (seed, step, rank,
world_size), ranks partition the single-process batch, resume and skip ranges are exact, eval is fixed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from llmlab.data.loader import TokenLoader
from llmlab.data.shards import write_shard_dir
from llmlab.errors import DataError


def _make(tmp_path, n_train=1000, n_val=300, pieces=(1.0,), vocab=2000, offset=0, name="d"):
    """Train stream = offset + arange(n_train) split into shards by the fractions in `pieces`."""
    stream = (offset + np.arange(n_train)) % vocab
    cuts = np.cumsum([int(f * n_train) for f in pieces[:-1]]).tolist()
    train = np.split(stream, cuts)
    out = tmp_path / name
    write_shard_dir(out, {"train": train, "val": [np.arange(n_val) % vocab]}, vocab_size=vocab, eos_id=0)
    return out


def _drain(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_contiguous_and_epoch_is_a_permutation(tmp_path):
    d = _make(tmp_path)
    loader = TokenLoader(d, block_size=10, batch_size=4, seed=1)
    assert loader.num_tokens == 1000 and loader.windows_per_epoch == 99 and loader.vocab_size == 2000
    starts = []
    for _ in range(24):  # 96 windows, all inside epoch 0
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.long
        assert torch.equal(y, x + 1)  # stream is arange, so y = x shifted by one
        assert torch.equal(x - x[:, :1], torch.arange(10).expand(4, 10))
        starts += x[:, 0].tolist()
    assert len(set(starts)) == 96 and all(s % 10 == 0 and s + 10 < 1000 for s in starts)
    assert starts != sorted(starts)  # shuffled


def test_crossing_shard_boundaries_reads_the_same_stream(tmp_path):
    one = TokenLoader(_make(tmp_path, name="one"), block_size=16, batch_size=3, seed=5)
    many = TokenLoader(_make(tmp_path, pieces=(0.333, 0.5, 0.167), name="many"), block_size=16,
                       batch_size=3, seed=5)
    assert len(many.stream.shards) == 3
    for (x1, y1), (x2, y2) in zip(_drain(one, 40), _drain(many, 40), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_deterministic_from_seed_and_step(tmp_path):
    d = _make(tmp_path)
    a, b, c = (TokenLoader(d, block_size=8, batch_size=5, seed=s) for s in (3, 3, 4))
    batches_a, batches_b = _drain(a, 30), _drain(b, 30)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(batches_a, batches_b, strict=True))
    assert not torch.equal(batches_a[0][0], c.next_batch()[0])
    # batch_at(step) is the same pure function, no matter what was read before.
    fresh = TokenLoader(d, block_size=8, batch_size=5, seed=3)
    assert torch.equal(fresh.batch_at(17)[0], batches_a[17][0]) and fresh.step == 0


def test_multi_epoch_shifts_windows_and_stays_valid(tmp_path):
    d = _make(tmp_path, n_train=103)
    loader = TokenLoader(d, block_size=10, batch_size=4, seed=0)
    assert loader.windows_per_epoch == 10
    starts = [s for step in range(12) for s in loader.window_starts(step)]  # 48 windows, ~5 epochs
    assert sorted(starts[:10]) == list(range(0, 100, 10))  # epoch 0: every window once, shift 0
    for epoch in range(1, 4):
        begin = loader._epoch_starts[epoch]
        count = loader._epoch_starts[epoch + 1] - begin
        shift = loader._shift(epoch)
        assert sorted(starts[begin:begin + count]) == [shift + 10 * k for k in range(count)]
    assert len({loader._shift(e) for e in range(1, 6)}) > 1
    for x, y in _drain(loader, 12):
        assert torch.equal(y, x + 1) and int(y.max()) < 103


def test_ranks_partition_the_single_process_batch(tmp_path):
    d = _make(tmp_path, n_train=2000)
    world, batch = 3, 2
    big = TokenLoader(d, block_size=7, batch_size=batch * world, seed=9)
    micro = TokenLoader(d, block_size=7, batch_size=batch, seed=9)
    ranks = [TokenLoader(d, block_size=7, batch_size=batch, seed=9, rank=r, world_size=world)
             for r in range(world)]
    for step in range(60):  # runs past one epoch (285 windows / 6 per step)
        parts = [r.next_batch()[0] for r in ranks]
        union = torch.cat(parts)
        assert torch.equal(union, big.next_batch()[0])
        assert torch.equal(union, torch.cat([micro.next_batch()[0] for _ in range(world)]))
        if step < 47:  # inside epoch 0 the ranks never share a window
            assert len({int(s) for s in union[:, 0]}) == batch * world


def test_resume_is_exact_and_survives_torch_save(tmp_path):
    d = _make(tmp_path)
    ref = TokenLoader(d, block_size=12, batch_size=3, seed=2)
    expected = _drain(ref, 50)
    run = TokenLoader(d, block_size=12, batch_size=3, seed=2)
    _drain(run, 21)
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = TokenLoader(d, block_size=12, batch_size=3, seed=2)
    resumed.load_state_dict(state)
    assert resumed.step == 21
    for (x, y), (xe, ye) in zip(_drain(resumed, 29), expected[21:], strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)


def test_state_from_another_rank_restores_this_ranks_position(tmp_path):
    d = _make(tmp_path)
    r0 = TokenLoader(d, block_size=5, batch_size=2, seed=0, rank=0, world_size=2)
    _drain(r0, 7)
    r1 = TokenLoader(d, block_size=5, batch_size=2, seed=0, rank=1, world_size=2)
    r1.load_state_dict(r0.state_dict())
    assert torch.equal(r1.next_batch()[0], r1.batch_at(7)[0])


def test_load_state_mismatch_is_a_data_error(tmp_path):
    d = _make(tmp_path)
    state = TokenLoader(d, block_size=12, batch_size=3, seed=2).state_dict()
    with pytest.raises(DataError, match=r"global_batch=3 but this loader has 4"):
        TokenLoader(d, block_size=12, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match=r"seed=2 but this loader has 7"):
        TokenLoader(d, block_size=12, batch_size=3, seed=7).load_state_dict(state)
    other = _make(tmp_path, offset=5, name="other")
    with pytest.raises(DataError, match="fingerprint"):
        TokenLoader(other, block_size=12, batch_size=3, seed=2).load_state_dict(state)


def test_skip_ranges_are_jumped_and_kept_in_state(tmp_path):
    d = _make(tmp_path)
    loader = TokenLoader(d, block_size=10, batch_size=2, seed=4)
    ref = [loader.batch_at(s)[0] for s in range(12)]
    loader.skip(2, 4)
    loader.skip(4, 6)  # chained ranges
    loader.skip(9, 10)
    got = [loader.next_batch()[0] for _ in range(6)]
    expect = [ref[s] for s in (0, 1, 6, 7, 8, 10)]
    assert all(torch.equal(a, b) for a, b in zip(got, expect, strict=True))
    assert loader.step == 11
    # A rollback: restore an earlier position but keep the skips recorded since then.
    early = TokenLoader(d, block_size=10, batch_size=2, seed=4)
    early.next_batch()
    saved = early.state_dict()
    saved["skips"] = loader.state_dict()["skips"]
    resumed = TokenLoader(d, block_size=10, batch_size=2, seed=4)
    resumed.load_state_dict(saved)
    again = [resumed.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(again, expect[1:], strict=True))
    with pytest.raises(ValueError):
        loader.skip(5, 5)


def test_iter_eval_is_ordered_and_independent_of_training(tmp_path):
    d = _make(tmp_path, n_val=300)
    loader = TokenLoader(d, block_size=10, batch_size=4, seed=0)
    first = list(loader.iter_eval())
    assert len(first) == 7  # 29 windows -> 7 full batches of 4, the partial one dropped
    assert [int(v) for v in torch.cat([x for x, _ in first])[:, 0]] == list(range(0, 280, 10))
    _drain(loader, 5)
    second = list(loader.iter_eval(max_batches=3))
    assert len(second) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=False))
    ranks = [TokenLoader(d, block_size=10, batch_size=4, rank=r, world_size=2) for r in range(2)]
    parts = [list(r.iter_eval(partition=True)) for r in ranks]
    assert [len(p) for p in parts] == [4, 3]
    assert torch.equal(parts[1][0][0], first[1][0])
    # A val split smaller than one batch still gives one (smaller) batch.
    tiny = TokenLoader(d, block_size=100, batch_size=8)
    assert [x.shape for x, _ in tiny.iter_eval()] == [(2, 100)]


def test_uint32_tokens_load_exactly(tmp_path):
    d = _make(tmp_path, vocab=200_000, offset=70_000)
    loader = TokenLoader(d, block_size=6, batch_size=2)
    assert loader.stream.shards[0].dtype == np.uint32
    x, y = loader.next_batch()
    assert int(x.min()) >= 70_000 and torch.equal(y, x + 1)


def test_block_size_larger_than_data_names_both(tmp_path):
    d = _make(tmp_path, n_train=50, n_val=20)
    with pytest.raises(DataError, match=r"block_size 64 needs at least 65 tokens but the train split .* "
                                        r"has 50"):
        TokenLoader(d, block_size=64, batch_size=2)
    loader = TokenLoader(d, block_size=30, batch_size=2)
    with pytest.raises(DataError, match=r"block_size 30 .* val split .* has 20"):
        next(loader.iter_eval())


def test_missing_meta_and_corrupt_shard(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; create it with `llmlab data prepare"):
        TokenLoader(tmp_path / "none", block_size=4, batch_size=1)
    d = _make(tmp_path)
    (d / "train_00000.bin").write_bytes((d / "train_00000.bin").read_bytes()[:100])
    with pytest.raises(DataError, match=r"train_00000\.bin is 100 bytes but its header promises"):
        TokenLoader(d, block_size=4, batch_size=1)
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match=r"has no meta\.json, so its preparation never finished"):
        TokenLoader(d, block_size=4, batch_size=1)
