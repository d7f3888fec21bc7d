"""Reward model: the score read at each sequence's last non-pad token (ragged, padded and packed), the
Bradley-Terry objective against hand-computed numbers, a reward model that separates held-out pairs of an
easy preference (the chosen answer states the right sum), `llmlab reward train` resuming exactly, and
`llmlab reward score`."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from llmlab.align import reward_objective
from llmlab.align.pairs import EncodedPair, PairBatches, collate, last_token_values
from llmlab.align.reward import score_sequences, sequence_scores, with_scalar_head
from llmlab.data.tasks import make_split
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train import OptimConfig, TrainConfig, Trainer

REFUSALS = ["I do not know.", "No idea, sorry.", "Ask me later.", "That is hard.", "Let me think about it."]


def tiny(vocab: int, head: str = "lm", seed: int = 0, block_size: int = 64) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama", "tiny", vocab_size=vocab, block_size=block_size,
                                          d_model=32, n_layer=2, n_head=4, head=head))


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer (no merges) with llmlab's chat tokens."""
    return Tokenizer.train(["abc def"], vocab_size=263, progress=False, workers=1)


def sum_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"}: the chosen answer states the right sum, the rejected one dodges."""
    rng = random.Random(seed)
    return [{"prompt": ex.prompt, "chosen": f"It is {ex.answer}.", "rejected": rng.choice(REFUSALS)}
            for ex in make_split("add", split, n, difficulty=1, seed=seed)]


def encode(tok, records: list[dict]) -> list[EncodedPair]:
    from llmlab.data.chat_data import encode_preference, parse_preference

    return [EncodedPair(*(tuple(x) for x in encode_preference(tok, parse_preference(r)))) for r in records]


def ragged_pairs(n: int, vocab: int, seed: int = 0) -> list[EncodedPair]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return tuple(rng.randrange(vocab) for _ in range(rng.randint(lo, hi)))

    return [EncodedPair(ids(1, 9), ids(1, 7), ids(1, 7)) for _ in range(n)]


# ---------------------------------------------------------------- where the score is read

@pytest.mark.parametrize("packed", [False, True])
def test_score_is_read_at_each_sequences_last_token(packed):
    model = tiny(50, head="scalar").eval()
    pairs = ragged_pairs(6, 50)
    batch = collate(pairs, packed=packed)
    assert len({int(n) for n in batch["lengths"]}) > 1  # ragged
    with torch.no_grad():
        got = sequence_scores(model, batch)
        sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        alone = [model.scores(torch.tensor([s]))[0, -1].item() for s in sequences]
    torch.testing.assert_close(got, torch.tensor(alone), atol=1e-5, rtol=0)
    assert score_sequences(model, sequences, batch_size=4) == pytest.approx(alone, abs=1e-5)


def test_last_token_values_picks_the_last_non_pad_position():
    pairs = [EncodedPair((1, 2, 3), (4, 5), (6,)), EncodedPair((7, 8), (9,), (10, 11))]
    for packed in (False, True):
        batch = collate(pairs, pad_id=0, packed=packed)
        assert last_token_values(batch["input_ids"], batch).tolist() == [5, 9, 6, 11]


def test_with_scalar_head_keeps_the_backbone():
    lm = tiny(50).eval()
    rm = with_scalar_head(lm).eval()
    assert rm.config.head == "scalar" and not hasattr(rm, "lm_head")
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rm.hidden(x), lm.hidden(x))
        torch.testing.assert_close(rm.scores(x), (lm.hidden(x) @ rm.score.weight.T).squeeze(-1))


# ---------------------------------------------------------------- the objective

def test_bradley_terry_objective_by_hand():
    model = tiny(50, head="scalar").eval()
    pairs = ragged_pairs(4, 50, seed=1)
    margin = torch.tensor([0.0, 0.5, -0.2, 1.0])
    batch = collate(pairs, {"margin": margin}, index=range(4))
    with torch.no_grad():
        r = torch.tensor([model.scores(torch.tensor([s]))[0, -1].item() for s in
                          [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]])
        out = reward_objective(center_coefficient=0.01).loss(model, batch)
    rc, rr = r[:4], r[4:]
    expected = (-F.logsigmoid(rc - rr - margin) + 0.01 * (rc + rr) ** 2).sum()
    assert out.weight == 4
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.metrics["accuracy"].item() == (rc > rr).sum().item()
    assert out.metrics["margin"].item() == pytest.approx((rc - rr).sum().item(), abs=1e-5)
    assert out.metrics["n_tokens"] == sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def test_reward_model_separates_held_out_pairs(tok):
    train, val = encode(tok, sum_records("train", 64)), encode(tok, sum_records("test", 16, seed=1))
    model = with_scalar_head(tiny(tok.vocab_size))
    held_out = PairBatches(val, 16, shuffle=False, packed=True)
    objective = reward_objective(held_out)
    before = objective.evaluate(model.eval())
    batches = PairBatches(train, 8, seed=0, packed=True)
    optim = OptimConfig(lr=3e-3, warmup_steps=5, max_steps=60, weight_decay=0.0)
    train = TrainConfig(eval_every=60, ckpt_every=0, progress=False, plot=False, device="cpu")
    summary = Trainer(model.train(), objective, batches, optim, train).fit()
    assert summary["val_accuracy"] == 1.0  # every held-out pair
    assert summary["val_margin"] > 1.0 and summary["val_loss"] < before["val_loss"] / 2


# ---------------------------------------------------------------- llmlab reward train / score

@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny chat checkpoint with its tokenizer, and preference files."""
    root = tmp_path_factory.mktemp("reward")
    tiny(tok.vocab_size).save(root / "sft")
    tok.save(root / "sft" / "tokenizer")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sum_records("train", 48)))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sum_records("test", 8, seed=1)))
    return root


def reward_args(base, out, *overrides) -> list[str]:
    return ["reward", "train", "--checkpoint", base / "sft", "--data", base / "train.jsonl", "--val",
            base / "val.jsonl", f"train.out_dir={out}", "data.batch_size=4", "optim.lr=3e-3",
            "optim.warmup_steps=2", "optim.max_steps=6", "train.eval_every=3", "train.ckpt_every=3",
            "train.progress=false", "train.plot=false", *overrides]


def test_reward_train_resumes_exactly_and_scores_files(base, tmp_path, capsys):
    from safetensors.torch import load_file

    from helpers import run_cli

    code, out, err = run_cli(capsys, *reward_args(base, tmp_path / "a"))
    assert code == 0, err
    straight = json.loads(out)
    code, _, err = run_cli(capsys, *reward_args(base, tmp_path / "b", "train.max_minutes=1e-9"))
    assert code == 0, err
    code, out, err = run_cli(capsys, *reward_args(base, tmp_path / "b"), "--resume", "auto")
    assert code == 0, err
    resumed = json.loads(out)
    assert straight["step"] == resumed["step"] == 6
    a, b = (load_file(f"{s['checkpoint']}/model.safetensors") for s in (straight, resumed))
    assert set(a) == set(b) and "score.weight" in a and "lm_head.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["val_accuracy"] == resumed["val_accuracy"]
    records = [json.loads(line) for line in open(f"{straight['run_dir']}/metrics.jsonl")]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(records[0])
    best = json.loads(open(f"{straight['run_dir']}/best.json").read())
    assert best["metric"] == "val_accuracy" and best["higher_is_better"] is True

    # score a preference file and a conversation file with the trained model
    ckpt = straight["checkpoint"]
    convo = tmp_path / "convo.jsonl"
    convo.write_text(json.dumps({"prompt": "What is 1 + 2?", "completion": "It is 3.", "id": 7}) + "\n")
    code, out, err = run_cli(capsys, "reward", "score", ckpt, "--data", convo, "--out", tmp_path / "s1.jsonl")
    assert code == 0, err
    scored = json.loads((tmp_path / "s1.jsonl").read_text())
    assert scored["id"] == 7 and isinstance(scored["score"], float)
    code, out, err = run_cli(capsys, "reward", "score", ckpt, "--data", base / "val.jsonl", "--out",
                             tmp_path / "s2.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "s2.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"score_chosen", "score_rejected"} <= set(r) for r in rows)
    accuracy = sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(straight["val_accuracy"])  # the same model, the same pairs

    model, tok = Transformer.load(ckpt), Tokenizer.load(f"{ckpt}/tokenizer")
    from llmlab.data.chat_data import encode_sft, parse_sft

    ids, _ = encode_sft(tok, parse_sft({"prompt": "What is 1 + 2?", "completion": "It is 3."}))
    assert scored["score"] == pytest.approx(score_sequences(model, [ids])[0], abs=1e-5)


def test_pair_records_carry_their_margin(tok, tmp_path):
    from llmlab.align.pairs import PairDataConfig, prepare_pairs

    records = [dict(r, margin=float(i)) for i, r in enumerate(sum_records("train", 6))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = prepare_pairs(PairDataConfig(train=str(tmp_path / "m.jsonl"), val_fraction=0.0), tok, 64)
    assert data.train_margin.tolist() == [float(i) for i in range(6)] and data.val == []


def test_preference_runs_train_without_dropout():
    from llmlab.align.pairs import without_dropout

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=50, block_size=16, dropout=0.2))
    plain = without_dropout(model).train()
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert plain.config.dropout == 0.0 and torch.equal(plain(x), plain(x))
        torch.testing.assert_close(plain(x), model.eval()(x))
