"""Distillation (`distill.teacher`): the KL term by hand, and a student that learns its teacher's rule.

The data follow x -> f(x) = (5x + 3) mod 64 (llmlab.data.synthetic). The teacher is trained on the same
stream with its tokens relabelled by a fixed permutation pi, so on token x it predicts pi f pi^-1 (x),
which differs from f(x) almost everywhere. A student distilled with weight 1 must pick up the teacher's
rule although its data say otherwise; the same student trained on the data alone must not.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    AFFINE_PERM,
    affine_agreement,
    affine_run_config,
    affine_shards,
    assert_one_line_error,
    run_cli,
)
from llmlab.config import check_config
from llmlab.errors import ConfigError
from llmlab.train.distill import DistillConfig, kl_to_teacher
from llmlab.train.pretrain import run_pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    shards = affine_shards(root / "shards")
    teacher_shards = affine_shards(root / "teacher_shards", relabel=AFFINE_PERM)
    run_pretrain(affine_run_config(teacher_shards, root, "train.run_name=teacher"))
    return shards, root / "runs" / "teacher" / "ckpt-000060"


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


def test_student_learns_the_teachers_rule_not_the_datas(data, tmp_path):
    shards, teacher = data
    distilled = run_pretrain(affine_run_config(shards, tmp_path, "train.run_name=student",
                                               f"distill.teacher={teacher}"))
    plain = run_pretrain(affine_run_config(shards, tmp_path, "train.run_name=plain"))
    agree_distilled = affine_agreement(distilled["checkpoint"], teacher)
    agree_plain = affine_agreement(plain["checkpoint"], teacher)
    assert agree_distilled > 0.8 and agree_plain < 0.2, (agree_distilled, agree_plain)
    # val_loss is cross-entropy on the data either way: the distilled student is far worse on it
    assert distilled["val_loss"] > plain["val_loss"] + 1.0


def test_weight_zero_is_plain_pretraining(data, tmp_path):
    shards, teacher = data
    a = run_pretrain(affine_run_config(shards, tmp_path, "train.run_name=a", "optim.max_steps=5"))
    b = run_pretrain(affine_run_config(shards, tmp_path, "train.run_name=b", "optim.max_steps=5",
                                       f"distill.teacher={teacher}", "distill.weight=0"))
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_bad_distill_config_is_one_line(data, tmp_path, capsys):
    shards, teacher = data
    base = ["pretrain", "--config", "configs/tiny.toml", f"data.shards={shards}",
            f"train.out_dir={tmp_path / 'r'}", "train.progress=false", "train.plot=false"]
    code, _, err = run_cli(capsys, *base, f"distill.teacher={tmp_path / 'missing'}")
    assert_one_line_error(code, err, "distill.teacher", "not a checkpoint directory")
    code, _, err = run_cli(capsys, *base, f"distill.teacher={teacher}", "distill.weight=1.5")
    assert_one_line_error(code, err, "distill.weight=1.5", "[0, 1]")
    other = affine_shards(tmp_path / "other", vocab=128)
    code, _, err = run_cli(capsys, *base[:3], f"data.shards={other}", *base[4:], f"distill.teacher={teacher}")
    assert_one_line_error(code, err, "64-token vocabulary", "128", "shards' tokenizer")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="temperature"):
        check_config(DistillConfig(teacher=str(teacher), temperature=0.0), "distill.")
