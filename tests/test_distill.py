"""Distillation (`distill.teacher`): the KL term by hand, and a student that learns its teacher's rule.

The data follow x -> f(x) = (5x + 3) mod 64 (llmlab.data.synthetic). The teacher is trained on the same
stream with its tokens relabelled by a fixed permutation pi, so on token x it predicts pi f pi^-1 (x),
which differs from f(x) almost everywhere. A student distilled with weight 1 must pick up the teacher's
rule although its data say otherwise; the same student trained on the data alone must not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from llmlab.config import load_config
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import ConfigError
from llmlab.model import Transformer
from llmlab.train.distill import DistillConfig, kl_to_teacher
from llmlab.train.pretrain import PretrainConfig, run_pretrain

V = 64
PERM = np.random.default_rng(7).permutation(V)


def _write(out, relabel=None, vocab=V):
    streams = {"train": [affine_stream(12000, V, 0)], "val": [affine_stream(2000, V, 2)]}
    if relabel is not None:
        streams = {k: [relabel[s] for s in v] for k, v in streams.items()}
    write_shard_dir(out, streams, vocab_size=vocab, extra={"tokenizer": {"vocab_size": vocab, "eos_id": None}})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    shards, teacher_shards = _write(root / "shards"), _write(root / "teacher_shards", relabel=PERM)
    run_pretrain(_cfg(teacher_shards, root, "train.run_name=teacher"))
    return shards, root / "runs" / "teacher" / "ckpt-000060"


def _cfg(shards, root, *overrides):
    base = [f"data.shards={shards}", f"train.out_dir={root / 'runs'}", "train.progress=false", "train.plot=false",
            "optim.max_steps=60", "optim.lr=1e-2", "train.eval_every=60", "train.ckpt_every=60"]
    return load_config(PretrainConfig, "configs/tiny.toml", base + list(overrides))


def test_kl_by_hand():
    student = torch.tensor([[0.0, math.log(2.0)]])  # softmax (1/3, 2/3)
    teacher = torch.tensor([[0.0, 0.0]])            # softmax (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert kl_to_teacher(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # tau = 2: both logits halved, times tau^2
    p = torch.softmax(student[0] / 2, 0)
    expected_t2 = 4 * (0.5 * math.log(0.5 / p[0].item()) + 0.5 * math.log(0.5 / p[1].item()))
    assert kl_to_teacher(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    x = torch.randn(2, 5, 7)
    assert kl_to_teacher(x, x).item() == pytest.approx(0.0, abs=1e-6)


def _agreement_with_teacher(student_ckpt, teacher_ckpt) -> float:
    """Share of predictable positions (not the random token every 16th) where the argmaxes agree."""
    x = torch.from_numpy(affine_stream(33 * 16, V, 5)).reshape(16, 33)[:, :32]
    s, t = Transformer.load(student_ckpt), Transformer.load(teacher_ckpt)
    with torch.no_grad():
        agree = s(x).argmax(-1) == t(x).argmax(-1)
    keep = (torch.arange(32) + 1) % 16 != 0  # the next token is not the random one
    return agree[:, keep].float().mean().item()


def test_student_learns_the_teachers_rule_not_the_datas(data, tmp_path):
    shards, teacher = data
    distilled = run_pretrain(_cfg(shards, tmp_path, "train.run_name=student", f"distill.teacher={teacher}"))
    plain = run_pretrain(_cfg(shards, tmp_path, "train.run_name=plain"))
    agree_distilled = _agreement_with_teacher(distilled["checkpoint"], teacher)
    agree_plain = _agreement_with_teacher(plain["checkpoint"], teacher)
    assert agree_distilled > 0.8 and agree_plain < 0.2, (agree_distilled, agree_plain)
    # val_loss is cross-entropy on the data either way: the distilled student is far worse on it
    assert distilled["val_loss"] > plain["val_loss"] + 1.0


def test_weight_zero_is_plain_pretraining(data, tmp_path):
    shards, teacher = data
    a = run_pretrain(_cfg(shards, tmp_path, "train.run_name=a", "optim.max_steps=5"))
    b = run_pretrain(_cfg(shards, tmp_path, "train.run_name=b", "optim.max_steps=5", f"distill.teacher={teacher}",
                          "distill.weight=0"))
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_bad_distill_config_is_one_line(data, tmp_path, capsys):
    shards, teacher = data
    base = ["pretrain", "--config", "configs/tiny.toml", f"data.shards={shards}", f"train.out_dir={tmp_path / 'r'}",
            "train.progress=false", "train.plot=false"]
    code, _, err = run_cli(capsys, *base, f"distill.teacher={tmp_path / 'missing'}")
    assert_one_line_error(code, err, "distill.teacher", "not a checkpoint directory")
    code, _, err = run_cli(capsys, *base, f"distill.teacher={teacher}", "distill.weight=1.5")
    assert_one_line_error(code, err, "distill.weight=1.5", "[0, 1]")
    other = _write(tmp_path / "other", vocab=128)
    code, _, err = run_cli(capsys, *base[:3], f"data.shards={other}", *base[4:], f"distill.teacher={teacher}")
    assert_one_line_error(code, err, "64-token vocabulary", "128", "shards' tokenizer")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(teacher=str(teacher), temperature=0.0).validate()
