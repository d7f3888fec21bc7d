"""SFT: the masked loss against hand-computed numbers, packing against padding, batches that resume, SFT
(full and LoRA) teaching a tiny model to reverse 3-letter words, and `llmlab sft` runs that resume exactly."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.align import sft_objective
from llmlab.align.lora import LoRAConfig, apply_lora
from llmlab.align.sft import (
    IGNORE,
    SFTBatches,
    collate,
    encode_examples,
    example_xy,
    make_rows,
    pack_rows,
    pad_rows,
)
from llmlab.data.chat_data import SFTExample, encode_sft
from llmlab.infer import generate
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train import OptimConfig, TrainConfig, Trainer

WORDS = ["".join(p) for p in itertools.product("abcdefgh", repeat=3)]
random.Random(0).shuffle(WORDS)
TRAIN_WORDS, TEST_WORDS = WORDS[:400], WORDS[400:]


def tiny(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama", "tiny", vocab_size=vocab, block_size=64, d_model=64,
                                          n_layer=2, n_head=4))


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer (no merges) with llmlab's chat tokens: one token per letter."""
    return Tokenizer.train(["abc def"], vocab_size=263, progress=False, workers=1)


def chat(word: str, answer: str) -> SFTExample:
    return SFTExample([{"role": "user", "content": word}, {"role": "assistant", "content": answer}])


def random_examples(n: int, vocab: int, seed: int = 0):
    """(ids, loss_mask) pairs of varied lengths with a prompt part (mask 0) and an answer part (mask 1)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt, answer = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        ids = rng.integers(0, vocab, prompt + answer).tolist()
        pairs.append((ids, [0] * prompt + [1] * answer))
    return pairs


def test_targets_are_the_next_tokens_where_the_mask_is_one():
    x, y = example_xy([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], max_len=16)
    assert x.tolist() == [5, 6, 7, 8] and y.tolist() == [IGNORE, 7, 8, 9]
    x, y = example_xy([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], max_len=2)  # cut to 2 inputs
    assert x.tolist() == [5, 6] and y.tolist() == [IGNORE, 7]
    # nothing left to learn after cutting: dropped
    assert encode_examples([([5, 6, 7, 8], [0, 0, 0, 1])], max_len=2) == []


def test_masked_loss_equals_the_hand_computed_sum():
    model = tiny(50).eval()
    pairs = random_examples(3, 50)
    rows = pad_rows(encode_examples(pairs, 32))
    x, y = collate(rows, pad_id=0, packed=False)
    out = sft_objective().loss(model, (x, y))
    with torch.no_grad():
        logp = F.log_softmax(model(x).float(), dim=-1)
    expected, kept = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[b, t] != IGNORE:
                expected -= logp[b, t, y[b, t]].item()
                kept += 1
    assert kept == sum(sum(m[1:]) for _, m in pairs)
    assert int(out.weight) == kept
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["n_tokens"] == x.numel()


@pytest.mark.parametrize("packed", [True, False])
def test_loss_equals_transformers_on_trl_style_labels(tmp_path, packed):
    """The same model exported to transformers, labels as TRL's completion-only loss makes them (input ids,
    -100 where the completion mask is 0 and on padding): the mean loss over kept tokens agrees."""
    from transformers import AutoModelForCausalLM

    from llmlab.model.hf import save_hf

    model = tiny(50).eval()
    save_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    pairs = random_examples(6, 50, seed=2)
    examples = encode_examples(pairs, 32)
    ours = sft_objective().loss(model, collate(pack_rows(examples, 32) if packed else pad_rows(examples),
                                               0, packed))
    width = max(len(row) for row, _ in pairs)

    def padded(row, fill):
        return row + [fill] * (width - len(row))

    x = torch.tensor([padded(row, 0) for row, _ in pairs])
    labels = torch.tensor([padded([t if m else -100 for t, m in zip(row, mask, strict=True)], -100)
                           for row, mask in pairs])
    attention = torch.tensor([padded([1] * len(row), 0) for row, _ in pairs])
    with torch.no_grad():
        theirs = hf(input_ids=x, attention_mask=attention, labels=labels).loss
    assert int(ours.weight) == int((labels[:, 1:] != -100).sum())
    assert (ours.loss_sum / ours.weight).item() == pytest.approx(theirs.item(), abs=1e-5)


def test_packing_keeps_examples_whole_and_apart():
    examples = encode_examples(random_examples(20, 50), 16)
    rows = pack_rows(examples, 16)
    assert all(len(x) <= 16 for x, _, _ in rows)
    assert sum(len(x) for x, _, _ in rows) == sum(len(x) for x, _ in examples)
    x, y, seg = rows[0]
    boundaries = np.flatnonzero(np.diff(seg)) + 1
    pieces = np.split(x, boundaries)
    assert [p.tolist() for p in pieces] == [e[0].tolist() for e in examples[:len(pieces)]]
    bx, by, bseg = collate(rows[:3], pad_id=0, packed=True)
    for i, (rx, _, rs) in enumerate(rows[:3]):
        assert (by[i, len(rx):] == IGNORE).all()  # padding never learns
        assert (bseg[i, len(rx):] == rs[-1] + 1).all()  # and is a segment of its own


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_packed_loss_equals_padded_loss(flavour):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(flavour, "tiny", vocab_size=50, block_size=32)).eval()
    examples = encode_examples(random_examples(12, 50, seed=1), 32)
    packed, padded = pack_rows(examples, 32), pad_rows(examples)
    assert len(packed) < len(padded)
    objective = sft_objective()
    with torch.no_grad():
        a = objective.loss(model, collate(packed, 0, packed=True))
        b = objective.loss(model, collate(padded, 0, packed=False))
    assert int(a.weight) == int(b.weight)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=0)


def test_batches_resume_where_they_left_off_and_split_over_ranks():
    rows = make_rows(encode_examples(random_examples(40, 50), 16), 16, packed=False, seed=0)
    a = SFTBatches(rows, 4, pad_id=0, packed=False, seed=3)
    first = [a.next_batch() for _ in range(15)]  # more than one epoch (10 batches)
    b = SFTBatches(rows, 4, pad_id=0, packed=False, seed=3)
    for _ in range(6):
        b.next_batch()
    c = SFTBatches(rows, 4, pad_id=0, packed=False, seed=3)
    c.load_state_dict(b.state_dict())
    for expected in first[6:]:
        torch.testing.assert_close(c.next_batch(), expected)
    # two ranks of 2 rows together read what one rank of 4 reads
    r0, r1 = (SFTBatches(rows, 2, pad_id=0, packed=False, seed=3, rank=r, world_size=2) for r in (0, 1))
    x0, x1 = r0.next_batch()[0], r1.next_batch()[0]
    width = first[0][0].shape[1]
    both = torch.cat([F.pad(x0, (0, width - x0.shape[1])), F.pad(x1, (0, width - x1.shape[1]))])
    assert both.tolist() == first[0][0].tolist()


# ---------------------------------------------------------------- SFT teaches a task

def word_rows(tok, answer, packed: bool):
    pairs = [encode_sft(tok, chat(w, answer(w))) for w in TRAIN_WORDS]
    return make_rows(encode_examples(pairs, 64), 64, packed, seed=0)


def fit(model, tok, answer, steps: int, lr: float, packed: bool = True) -> None:
    rows = word_rows(tok, answer, packed)
    batches = SFTBatches(rows, 8 if packed else 32, pad_id=tok.chat_template.pad_id, packed=packed)
    optim = OptimConfig(lr=lr, warmup_steps=10, max_steps=steps, weight_decay=0.0)
    Trainer(model, sft_objective(), batches, optim,
            TrainConfig(progress=False, plot=False, eval_every=0, device="cpu")).fit()


def accuracy(model, tok, answer) -> float:
    """Share of held-out words whose greedy 3-letter reply is answer(word)."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": w}], add_generation_prompt=True)[0]
               for w in TEST_WORDS]
    n = len(prompts[0])
    out = generate(model.eval(), prompts, 3, temperature=0)
    right = [tok.decode(o[n:].tolist()) == answer(w) for o, w in zip(out, TEST_WORDS, strict=True)]
    return float(np.mean(right))


def reverse(w: str) -> str:
    return w[::-1]


def copy(w: str) -> str:
    return w


def test_sft_teaches_a_tiny_model_to_reverse_words(tok):
    model = tiny(tok.vocab_size)
    assert accuracy(model, tok, reverse) < 0.05
    fit(model, tok, reverse, steps=150, lr=3e-3, packed=True)
    assert accuracy(model, tok, reverse) > 0.9  # held-out words, never seen in training


def test_lora_sft_learns_the_task(tok):
    """A model that copies words learns to reverse them with adapters only (its weights stay as they were)."""
    model = tiny(tok.vocab_size)
    fit(model, tok, copy, steps=100, lr=3e-3, packed=False)
    assert accuracy(model, tok, copy) > 0.9
    assert accuracy(model, tok, reverse) < 0.3  # right only on palindromes and lucky words
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    fit(model, tok, reverse, steps=200, lr=2e-2, packed=False)
    assert accuracy(model, tok, reverse) > 0.9
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------- llmlab sft: runs that resume exactly

@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny checkpoint (weights, config, tokenizer) and a JSONL of reversal records."""
    root = tmp_path_factory.mktemp("sft")
    tiny(tok.vocab_size).save(root / "base")
    tok.save(root / "base" / "tokenizer")
    lines = [f'{{"prompt": "{w}", "completion": "{w[::-1]}"}}' for w in TRAIN_WORDS[:120]]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def sft_config(base, out, *overrides):
    from llmlab.align.sft import SFTConfig
    from llmlab.config import load_config

    return load_config(SFTConfig, None, [
        f"checkpoint={base / 'base'}", f"data.train={base / 'train.jsonl'}", f"train.out_dir={out}",
        "data.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.max_steps=6",
        "train.eval_every=3", "train.ckpt_every=3", "train.eval_batches=2", "train.progress=false",
        "train.plot=false", *overrides])


def final_state(summary) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{summary['checkpoint']}/model.safetensors")


def losses(run_dir) -> list[float]:
    import json

    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("lora", [False, True])
def test_resumed_run_equals_the_uninterrupted_one(base, tmp_path, lora):
    from llmlab.align.sft import run_sft

    extra = ["lora.rank=4"] if lora else ["data.packing=false"]
    straight = run_sft(sft_config(base, tmp_path / "a", *extra))
    run_sft(sft_config(base, tmp_path / "b", *extra, "optim.max_steps=6", "train.max_minutes=1e-9"))
    resumed = run_sft(sft_config(base, tmp_path / "b", *extra), resume="auto")
    assert straight["step"] == resumed["step"] == 6
    a, b = final_state(straight), final_state(resumed)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])
    assert straight["val_loss"] == resumed["val_loss"]
    if lora:
        assert all(".lora_" in k for k in a)  # adapters only in the checkpoints
        from llmlab.align.lora import load_lora

        x = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = load_lora(straight["checkpoint"])(x)
            torch.testing.assert_close(Transformer.load(straight["merged"])(x), expected, atol=1e-5, rtol=0)


def test_cli_adds_missing_chat_tokens_and_says_so(tmp_path, capsys):
    import json

    from helpers import run_cli

    plain = Tokenizer.train(["abc def"], vocab_size=257, special_tokens=["<|eos|>"], progress=False,
                            workers=1)
    tiny(plain.vocab_size).save(tmp_path / "base")
    plain.save(tmp_path / "base" / "tokenizer")
    lines = [f'{{"messages": [{{"role": "user", "content": "{w}"}}, {{"role": "assistant", "content": '
             f'"{w[::-1]}"}}]}}' for w in TRAIN_WORDS[:24]]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, "sft", "--checkpoint", tmp_path / "base", "--data",
                             tmp_path / "train.jsonl", f"train.out_dir={tmp_path / 'runs'}",
                             "optim.max_steps=2", "data.batch_size=2", "train.progress=false",
                             "train.plot=false")
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and "added 5 chat tokens" in err, err
    summary = json.loads(out)
    grown = Transformer.load(summary["checkpoint"])
    assert grown.config.vocab_size == 262
    saved = Tokenizer.load(f"{summary['checkpoint']}/tokenizer")
    assert saved.chat_template.pad_id == saved.special_tokens["<|pad|>"]


def test_lora_sft_from_an_imported_hf_model(tmp_path, capsys):
    """import-hf'd checkpoint -> LoRA SFT: chat tokens added (two notes), adapter-only checkpoints, and a
    merged model that loads as a plain Transformer and equals base + adapters."""
    import json

    from helpers import run_cli
    from llmlab.align.lora import load_lora
    from llmlab.model.hf import import_hf, save_hf

    plain = Tokenizer.train(["abc def"], vocab_size=257, special_tokens=["<|eos|>"], progress=False,
                            workers=1)
    save_hf(tiny(plain.vocab_size), tmp_path / "hf", tokenizer=plain)
    import_hf(tmp_path / "hf", tmp_path / "imported")
    capsys.readouterr()  # the import's progress bar
    lines = [json.dumps({"prompt": w, "completion": w[::-1]}) for w in TRAIN_WORDS[:24]]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, "sft", "--checkpoint", tmp_path / "imported", "--data",
                             tmp_path / "train.jsonl", f"train.out_dir={tmp_path / 'runs'}", "lora.rank=4",
                             "optim.max_steps=2", "data.batch_size=2", "train.progress=false",
                             "train.plot=false", "optim.lr=1e-2")
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 2 and "added 5 chat tokens" in notes[0] and "lora.rank=0" in notes[1], err
    summary = json.loads(out)
    x = torch.randint(0, 262, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_lora(summary["checkpoint"], base_loader=lambda base, meta: _grown(base))(x)
        torch.testing.assert_close(Transformer.load(summary["merged"])(x), expected, atol=1e-5, rtol=0)


def _grown(base):
    from llmlab.align.sft import load_model

    return load_model(base, Tokenizer.load(f"{base}/tokenizer"))[0]
