"""Generation: cached greedy == uncached greedy (both flavours, batched prompts), sampling transforms,
seeds, stop tokens, streaming, the speculative dispatch, and bad inputs."""

from __future__ import annotations

import importlib

import pytest
import torch

from llmlab.errors import ConfigError, ModelError
from llmlab.infer import generate, stream
from llmlab.infer.sampling import filter_logits, next_token, probs_from_logits, sample
from llmlab.model import ModelConfig, Transformer

FLAVOURS = {"gpt2": dict(), "llama": dict(n_kv_head=2)}


def tiny(flavour: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(flavour, "tiny", **FLAVOURS[flavour])).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy picks are far from ties
        model.lm_head.weight.mul_(5)
    return model


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The definition: run the whole sequence through the model each step and take the argmax."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cached_greedy_equals_recompute_for_one_prompt(flavour):
    model = tiny(flavour)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = generate(model, prompt, 40, temperature=0)
    assert out.shape == (48,) and out.dtype == torch.long
    assert out.tolist() == greedy_by_recompute(model, prompt, 40)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batched_prompts_of_different_lengths_match_each_prompt_alone(flavour):
    model = tiny(flavour)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    out = generate(model, prompts, 25, temperature=0)
    assert out.shape == (3, 11 + 25)
    for b, p in enumerate(prompts):
        expected = greedy_by_recompute(model, p, 25)
        assert out[b, : len(expected)].tolist() == expected
        assert (out[b, len(expected):] == -1).all()  # right padding after shorter rows


def test_equal_length_batch_as_tensor():
    model = tiny("gpt2")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = generate(model, ids, 10, temperature=0)
    assert out.shape == (2, 14)
    for b in range(2):
        assert out[b].tolist() == greedy_by_recompute(model, ids[b].tolist(), 10)


def test_stream_yields_the_generated_tokens():
    model = tiny("llama")
    full = generate(model, [1, 2, 3], 12, temperature=0.9, top_k=20, seed=3)
    assert list(stream(model, [1, 2, 3], 12, temperature=0.9, top_k=20, seed=3)) == full[3:].tolist()
    batched = list(stream(model, [[1, 2], [3]], 4, temperature=0))
    assert len(batched) == 4 and batched[0].shape == (2,)


def test_seed_makes_sampling_reproducible():
    model = tiny("gpt2")
    a = generate(model, [1, 2, 3], 30, temperature=1.0, seed=7)
    b = generate(model, [1, 2, 3], 30, temperature=1.0, seed=7)
    c = generate(model, [1, 2, 3], 30, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = generate(model, [1, 2, 3], 30, temperature=1.0, seed=7)  # the global RNG does not matter
    assert torch.equal(a, d)


def test_stop_token_ends_each_row():
    model = tiny("gpt2")
    free = generate(model, [[5, 6], [9, 9, 9]], 20, temperature=0)
    stop = int(free[0, 2 + 4])  # row 0's fifth new token
    out = generate(model, [[5, 6], [9, 9, 9]], 20, temperature=0, stop=stop)
    row0 = out[0].tolist()
    first = free[0, 2:].tolist().index(stop)
    assert row0[: 2 + first + 1] == free[0, : 2 + first + 1].tolist()
    assert all(t == -1 for t in row0[2 + first + 1:])
    single = generate(model, [5, 6], 20, temperature=0, stop=[stop, 10**6 % 256])
    assert single.tolist()[-1] in (stop, 10**6 % 256) and len(single) <= 22


def test_max_new_tokens_zero_returns_the_prompt():
    model = tiny("gpt2")
    assert generate(model, [4, 5], 0).tolist() == [4, 5]


def test_generation_restores_training_mode():
    model = tiny("gpt2").train()
    generate(model, [1], 3, temperature=0)
    assert model.training


def test_sampling_transform_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(logits, -1)  # [0.6439, 0.2369, 0.0871, 0.0321]
    torch.testing.assert_close(probs_from_logits(logits), p)
    torch.testing.assert_close(probs_from_logits(logits, temperature=2.0), torch.softmax(logits / 2, -1))
    top2 = probs_from_logits(logits, top_k=2)
    torch.testing.assert_close(top2, torch.tensor([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0]))
    # top_p=0.7: 0.644 < 0.7 so the second token is needed too; top_p=0.6 keeps only the first.
    torch.testing.assert_close(probs_from_logits(logits, top_p=0.7), top2)
    torch.testing.assert_close(probs_from_logits(logits, top_p=0.6), torch.tensor([1.0, 0, 0, 0]))
    top3 = torch.cat([p[:3] / p[:3].sum(), torch.zeros(1)])
    torch.testing.assert_close(probs_from_logits(logits, top_p=0.95), top3)
    torch.testing.assert_close(probs_from_logits(logits, temperature=0), torch.tensor([1.0, 0, 0, 0]))
    assert torch.isinf(filter_logits(logits, top_k=1)[1:]).all()
    batch = torch.stack([logits, logits.flip(0)])  # works row by row
    assert next_token(batch, temperature=0).tolist() == [0, 3]


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = sample(probs.expand(20000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert (freq - probs).abs().sum() / 2 < 0.01  # total variation


def test_draft_dispatches_to_speculative_decoding(monkeypatch):
    seen = {}

    def fake(model, draft, ids, max_new_tokens, **kw):
        seen.update(kw, draft=draft)
        return torch.tensor([1, 2, 3])

    monkeypatch.setattr(importlib.import_module("llmlab.infer.generate"), "speculative_generate", fake)
    model = tiny("gpt2")
    out = generate(model, [1], 2, temperature=0, draft=model, speculate_k=3)
    assert out.tolist() == [1, 2, 3] and seen["speculate_k"] == 3 and seen["draft"] is model


@pytest.mark.parametrize("ids,kwargs,error,match", [
    (list(range(65)), dict(max_new_tokens=1), ModelError,
     r"65 tokens but the model's context \(block_size\) is 64"),
    (list(range(60)), dict(max_new_tokens=10), ModelError,
     r"prompt \(60 tokens\) plus max_new_tokens \(10\).*at most 4"),
    ([], dict(max_new_tokens=1), ModelError, "prompt is empty"),
    ([[1, 2], []], dict(max_new_tokens=1), ModelError, "prompt is empty"),
    ([1, 300], dict(max_new_tokens=1), ModelError,
     r"token id 300 is outside the model's vocabulary \[0, 256\)"),
    ([1, -2], dict(max_new_tokens=1), ModelError, r"token id -2"),
    ("hello", dict(max_new_tokens=1), ModelError, "encode text with the tokenizer"),
    (torch.zeros(1, 1, 2, dtype=torch.long), dict(max_new_tokens=1), ModelError, r"shape \(1, 1, 2\)"),
    ([1], dict(max_new_tokens=-1), ConfigError, "max_new_tokens=-1"),
    ([1], dict(max_new_tokens=2, temperature=-0.5), ConfigError, "temperature=-0.5"),
    ([1], dict(max_new_tokens=2, top_k=0), ConfigError, "top_k=0"),
    ([1], dict(max_new_tokens=2, top_p=1.5), ConfigError, r"top_p=1.5 must be in \(0, 1\]"),
    ([1], dict(max_new_tokens=2, stop="eos"), ConfigError, "stop='eos'"),
])
def test_bad_generation_input_is_one_clear_error(ids, kwargs, error, match):
    model = tiny("gpt2")
    with pytest.raises(error, match=match):
        generate(model, ids, **kwargs)
    with pytest.raises(error, match=match):
        stream(model, ids, **kwargs)  # refused when called, before any token is made
