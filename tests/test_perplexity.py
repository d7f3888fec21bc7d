"""Perplexity: exp of the mean next-token NLL over every token of the held-out windows, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from llmlab.data.shards import write_shard_dir
from llmlab.errors import ConfigError
from llmlab.evals.perplexity import evaluate_checkpoints, evaluate_perplexity, perplexity
from llmlab.model import ModelConfig, Transformer


class Bigram(nn.Module):
    """logits[b, t] = table[idx[b, t]]: a model whose every probability is known in closed form."""

    def __init__(self, table: torch.Tensor, block_size: int):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = ModelConfig(vocab_size=table.shape[0], block_size=block_size, n_layer=1, n_head=1,
                                  d_model=4)

    def forward(self, idx):
        return self.table[idx]


def test_uniform_model_has_perplexity_equal_to_vocab():
    batches = [(torch.zeros(2, 5, dtype=torch.long), torch.arange(10).view(2, 5) % 7)]
    result = perplexity(lambda x: torch.zeros(*x.shape, 7), batches)
    assert result["ppl"] == pytest.approx(7.0) and result["tokens"] == 10


def test_perplexity_matches_hand_computation(tmp_path):
    V, T = 5, 4
    # 14 tokens: windows of 5 at 0, 4, 8 -> 3 windows
    val = np.array([0, 1, 2, 3, 4, 0, 0, 1, 4, 2, 3, 3, 1, 0])
    write_shard_dir(tmp_path, {"train": [np.arange(20) % V], "val": [val]}, vocab_size=V)
    table = torch.tensor(np.random.default_rng(0).normal(size=(V, V)), dtype=torch.float32)
    model = Bigram(table, T)
    # by hand: windows start at 0, T, 2T (stride T, length T + 1); each predicts tokens start+1 .. start+T
    logp = table.double().log_softmax(-1).numpy()
    nll = [-logp[val[s + i], val[s + i + 1]] for s in (0, 4, 8) for i in range(T)]
    want = math.exp(sum(nll) / len(nll))
    got = evaluate_perplexity(model, tmp_path, block_size=T, batch_size=2)
    assert got["tokens"] == 12 == len(nll)
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # the token-weighted mean, not a mean of batch means: batch 1 has 2 windows, batch 2 one
    got1 = evaluate_perplexity(model, tmp_path, block_size=T, batch_size=1)
    assert got1["ppl"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        evaluate_perplexity(model, tmp_path, block_size=T + 1)


def test_evaluate_checkpoints_same_windows(tmp_path):
    rng = np.random.default_rng(1)
    write_shard_dir(tmp_path / "shards",
                    {"train": [rng.integers(0, 256, 600)], "val": [rng.integers(0, 256, 600)]},
                    vocab_size=256)
    torch.manual_seed(0)
    small = Transformer(ModelConfig.preset("gpt2", "tiny", block_size=32))
    big = Transformer(ModelConfig.preset("gpt2", "tiny"))
    small.save(tmp_path / "a")
    big.save(tmp_path / "b")
    rows = evaluate_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "shards", progress=False)
    assert [r["block_size"] for r in rows] == [32, 32]  # compared at the smaller context
    assert rows[0]["tokens"] == rows[1]["tokens"] == (600 - 1) // 32 * 32
    for row, model in zip(rows, (small, big), strict=True):
        direct = evaluate_perplexity(model, tmp_path / "shards", block_size=32)
        assert row["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
        assert row["file_bytes"] > 0 and row["quantization"] is None
        assert 150 < row["ppl"] < 400  # an untrained model is about uniform over 256 tokens
