"""DPO: completion log-probs against a brute-force sum (padded and packed), the objective against
llmlab.align.losses on those numbers with TRL's metric names, live and LoRA references against the
precomputed one, DPO raising the held-out chosen-minus-rejected margin, and `llmlab dpo` runs (resume, LoRA
with merge)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmlab.align import dpo_objective
from llmlab.align.dpo import (
    adapter_free_reference,
    frozen_reference,
    reference_logps,
    sequence_logps,
)
from llmlab.align.lora import LoRAConfig, apply_lora
from llmlab.align.losses import dpo_loss
from llmlab.align.pairs import EncodedPair, PairBatches, collate
from llmlab.data.tasks import make_split
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train import OptimConfig, TrainConfig, Trainer

TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}
REFUSALS = ["I do not know.", "No idea, sorry.", "Ask me later.", "That is hard.", "Let me think about it."]


def tiny(vocab: int, seed: int = 0, block_size: int = 64) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama", "tiny", vocab_size=vocab, block_size=block_size,
                                          d_model=32, n_layer=2, n_head=4))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["abc def"], vocab_size=263, progress=False, workers=1)


def sum_records(split: str, n: int, seed: int = 0) -> list[dict]:
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


def brute_force_logps(model, pairs: list[EncodedPair]) -> torch.Tensor:
    """[2B]: sum of log p(completion token | everything before it), each sequence run alone."""
    out = []
    for prompt, completion in [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).float(), dim=-1)[0]
        out.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])))
    return torch.tensor(out)


@pytest.mark.parametrize("packed", [False, True])
def test_completion_logps_equal_the_brute_force_sum(packed):
    model = tiny(50).eval()
    pairs = ragged_pairs(5, 50)
    with torch.no_grad():
        got = sequence_logps(model, collate(pairs, packed=packed))
    torch.testing.assert_close(got, brute_force_logps(model, pairs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", [dict(loss_type="sigmoid"), dict(loss_type="ipo"),
                                  dict(loss_type="sigmoid", label_smoothing=0.2)])
def test_objective_is_the_dpo_loss_of_the_models_logps(kind):
    policy, reference = tiny(50, seed=0).eval(), tiny(50, seed=1).eval()
    pairs = ragged_pairs(4, 50, seed=2)
    batches = PairBatches(pairs, 4, shuffle=False)
    batches.extras = reference_logps(frozen_reference(reference), batches)
    batch = batches.next_batch()
    with torch.no_grad():
        out = dpo_objective(beta=0.5, **kind).loss(policy, batch)
    pol, ref = brute_force_logps(policy, pairs), brute_force_logps(reference, pairs)
    lengths = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])
    expected = dpo_loss(pol[:4], pol[4:], ref[:4], ref[4:], beta=0.5, chosen_lengths=lengths[:4],
                        rejected_lengths=lengths[4:], **kind).sum()
    assert out.weight == 4
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-4)
    assert set(out.metrics) == TRL_METRICS | {"n_tokens"}
    assert out.metrics["logps/chosen"].item() == pytest.approx(pol[:4].sum().item(), abs=1e-4)
    margins = 0.5 * ((pol[:4] - ref[:4]) - (pol[4:] - ref[4:]))
    assert out.metrics["rewards/margins"].item() == pytest.approx(margins.sum().item(), abs=1e-4)
    assert out.metrics["rewards/accuracies"].item() == (margins > 0).sum().item()


def test_live_and_adapter_free_references_equal_the_precomputed_one():
    model = tiny(50).eval()
    pairs = ragged_pairs(6, 50, seed=3)
    batches = PairBatches(pairs, 3, shuffle=False)
    precomputed = reference_logps(frozen_reference(model), batches)
    batch = collate(pairs[:3])
    with torch.no_grad():
        live = dpo_objective(reference=frozen_reference(model)).loss(model, batch)
    batch.update({k: v[:3] for k, v in precomputed.items()})
    with torch.no_grad():
        stored = dpo_objective().loss(model, batch)
    assert live.loss_sum.item() == pytest.approx(stored.loss_sum.item(), abs=1e-6)
    # LoRA: with trained (non-zero) adapters, switching them off gives the base model back
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    off = reference_logps(adapter_free_reference(model), batches)
    torch.testing.assert_close(off["ref_chosen"], precomputed["ref_chosen"], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, batch)[:3], precomputed["ref_chosen"][:3], atol=1e-2)


def test_dpo_raises_the_held_out_margin(tok):
    train, val = encode(tok, sum_records("train", 64)), encode(tok, sum_records("test", 16, seed=1))
    model = tiny(tok.vocab_size)
    reference = frozen_reference(model)
    batches = PairBatches(train, 8, seed=0, packed=True)
    held_out = PairBatches(val, 16, shuffle=False, packed=True)
    for pairs in (batches, held_out):
        pairs.extras = reference_logps(reference, pairs)
    objective = dpo_objective(beta=0.1, val=held_out)
    before = objective.evaluate(model.eval())
    assert before["val_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    optim = OptimConfig(lr=3e-3, warmup_steps=5, max_steps=40, weight_decay=0.0)
    train_cfg = TrainConfig(eval_every=40, ckpt_every=0, progress=False, plot=False, device="cpu")
    after = Trainer(model.train(), objective, batches, optim, train_cfg).fit()
    gap = {name: run["val_logps/chosen"] - run["val_logps/rejected"] for name, run in
           (("before", before), ("after", after))}
    assert gap["after"] > gap["before"] + 10  # nats: the preferred answers gained clearly on held-out pairs
    assert after["val_rewards/accuracies"] == 1.0 and after["val_rewards/margins"] > 1.0


# ---------------------------------------------------------------- llmlab dpo

@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("dpo")
    tiny(tok.vocab_size).save(root / "sft")
    tok.save(root / "sft" / "tokenizer")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sum_records("train", 40)))
    return root


def dpo_args(base, out, *overrides) -> list:
    return ["dpo", "--checkpoint", base / "sft", "--data", base / "train.jsonl", f"train.out_dir={out}",
            "data.batch_size=4", "data.val_fraction=0.2", "optim.lr=3e-3", "optim.warmup_steps=2",
            "optim.max_steps=6", "train.eval_every=3", "train.ckpt_every=3", "train.progress=false",
            "train.plot=false", *overrides]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


@pytest.mark.parametrize("extra", [[], ["lora.rank=4", "data.packing=false"]], ids=["full", "lora"])
def test_dpo_cli_resumes_exactly(base, tmp_path, capsys, extra):
    from safetensors.torch import load_file

    from helpers import run_cli

    code, out, err = run_cli(capsys, *dpo_args(base, tmp_path / "a", *extra))
    assert code == 0, err
    straight = json.loads(out)
    code, _, err = run_cli(capsys, *dpo_args(base, tmp_path / "b", *extra, "train.max_minutes=1e-9"))
    assert code == 0, err
    code, out, err = run_cli(capsys, *dpo_args(base, tmp_path / "b", *extra), "--resume", "auto")
    assert code == 0, err
    resumed = json.loads(out)
    assert straight["step"] == resumed["step"] == 6
    a, b = (load_file(f"{s['checkpoint']}/model.safetensors") for s in (straight, resumed))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    records = metrics(straight["run_dir"])
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in metrics(resumed["run_dir"])
                                                          if "loss" in r]
    assert TRL_METRICS <= set(records[0])
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    best = json.loads(open(f"{straight['run_dir']}/best.json").read())
    assert best["metric"] == "val_rewards/margins" and best["higher_is_better"] is True
    if extra:
        assert all(".lora_" in k for k in a)
        merged = Transformer.load(straight["merged"])
        assert merged.config.vocab_size == tok_vocab(base)


def tok_vocab(base) -> int:
    return Tokenizer.load(base / "sft" / "tokenizer").vocab_size


def test_live_reference_runs_like_the_precomputed_one(base, tmp_path, capsys):
    from helpers import run_cli

    losses = {}
    for mode in ("precomputed", "live"):
        code, out, err = run_cli(capsys, *dpo_args(base, tmp_path / mode, f"dpo.reference={mode}",
                                                   "optim.max_steps=3", "train.ckpt_every=0"))
        assert code == 0, err
        losses[mode] = [r["loss"] for r in metrics(json.loads(out)["run_dir"]) if "loss" in r]
    assert losses["live"] == pytest.approx(losses["precomputed"], abs=1e-5)
