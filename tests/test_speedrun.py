"""`llmlab speedrun` end to end on a tiny corpus, and the report's baseline arithmetic by hand."""

import json
import math

import numpy as np
import pytest

from llmlab.cli import main
from llmlab.config import find_preset, load_config, preset_names
from llmlab.data.shards import write_shard
from llmlab.speedrun import load_preset, unigram_baseline
from llmlab.train.pretrain import PretrainConfig

TINY_PRESET = """
[tokenizer]
vocab_size = 280
[corpus]
sources = ["{corpus}"]
val_fraction = 0.2
[samples]
prompts = ["the "]
max_new_tokens = 8
[pretrain.model]
n_layer = 1
n_head = 2
d_model = 32
block_size = 32
[pretrain.data]
batch_size = 4
[pretrain.optim]
lr = 1e-2
warmup_steps = 2
max_steps = 30
[pretrain.train]
eval_every = 10
eval_batches = 2
ckpt_every = 10
device = "cpu"
"""


@pytest.fixture
def tiny_preset(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    # A Markov chain over words with two successors each: far more predictable than its unigram.
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    for i in range(40):
        w, text = 0, []
        for _ in range(80):
            text.append(words[w])
            w = (w + 1 + 5 * int(rng.integers(2))) % len(words)
        (docs / f"d{i:02d}.txt").write_text(" ".join(text) + ".\n")
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET.format(corpus=str(docs / "*.txt")))
    return preset


def test_speedrun_writes_a_complete_report(tiny_preset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", "--preset", str(tiny_preset), "--out", str(out)]) == 0
    fig = json.loads((out / "report.json").read_text())
    assert fig["steps"] == 30 and fig["tokens_seen"] == 30 * 4 * 32
    assert fig["vocab_size"] == 280
    assert math.isclose(fig["bits_per_byte"], fig["val_loss"] / math.log(2) / fig["bytes_per_token"])
    assert math.isclose(fig["val_ppl"], math.exp(fig["val_loss"]))
    # Two successors per word: a model that learned any context beats the unigram baseline quickly.
    assert fig["val_loss"] < fig["unigram_loss"]
    report = (out / "report.md").read_text()
    assert "bits per byte" in report and "unigram baseline" in report
    for name in ["plots/loss.png", "samples.md", "tokenizer/llmlab.json", "shards/meta.json",
                 "metrics.jsonl"]:
        assert (out / name).exists(), name
    # A second run reuses the tokenizer and shards.
    assert main(["speedrun", "--preset", str(tiny_preset), "--out", str(out)]) == 0
    assert "tokenizer: reusing" in capsys.readouterr().out


def test_unigram_baseline_by_hand(tmp_path):
    # train counts: token 0 x3, token 1 x1 over vocab 3; add-one: p = (4/7, 2/7, 1/7).
    write_shard(tmp_path / "train_00000.bin", np.array([0, 0, 0, 1]), vocab_size=3)
    write_shard(tmp_path / "val_00000.bin", np.array([0, 2]), vocab_size=3)
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert math.isclose(unigram_baseline(tmp_path, 3), expected)


def test_presets_load_and_unknown_preset_is_one_line(capsys):
    assert {"cpu-demo", "gpt2-124M"} <= set(preset_names("llmlab.presets"))
    cfg = load_preset("cpu-demo", ["pretrain.optim.max_steps=7"])
    assert cfg.pretrain.optim.max_steps == 7 and cfg.corpus.sources == ["stdlib"]
    # The [pretrain] section comes from the named pretraining preset, shared with `llmlab pretrain`.
    pretrain = load_config(PretrainConfig, find_preset("cpu-demo"))
    assert cfg.pretrain.model == pretrain.model
    assert load_preset("cpu-demo", ["pretrain_config=tiny"]).pretrain.model.d_model == 32
    assert main(["speedrun", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'nope' is neither a TOML file nor a preset" in err
