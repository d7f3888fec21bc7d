"""llmlab.align.rollout: batched rollouts over ragged prompts give, row by row, what each prompt alone gives:
the same greedy response, the same log-probs and values, and the reward-model score at the last real token."""

from __future__ import annotations

import pytest
import torch

from llmlab.align.rollout import (
    MinibatchQueue,
    PromptStream,
    at_response,
    last_token_scores,
    pack,
    response_logprobs,
    response_values,
    rollout,
)
from llmlab.errors import ConfigError, ModelError
from llmlab.infer import generate
from llmlab.model import ModelConfig, Transformer
from llmlab.model.transformer import RaggedLayout

VOCAB, PAD = 48, 0


def tiny(flavour: str, seed: int, head: str = "lm") -> Transformer:
    torch.manual_seed(seed)
    gqa = flavour == "llama-gqa"  # grouped-query attention: one key/value head for two query heads
    cfg = ModelConfig.preset("llama" if gqa else flavour, "tiny", vocab_size=VOCAB, block_size=32,
                             d_model=32, n_layer=2, n_head=2, head=head, n_kv_head=1 if gqa else None)
    return Transformer(cfg).eval()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19]]


def alone_logprobs(model, prompt, response) -> list[float]:
    """log p(response[t] | prompt + response[:t]) from the full logits of the row alone."""
    seq = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(seq).float().log_softmax(-1)[0]
    return [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_ragged_rollout_matches_each_prompt_alone(flavour):
    policy, ref = tiny(flavour, 0), tiny(flavour, 1)
    rm = tiny(flavour, 2, head="scalar")
    # A stop id on the greedy path of prompt 0 (by its third token): that row ends early, others may run on.
    free = generate(policy, PROMPTS[0], 6, temperature=0).tolist()[len(PROMPTS[0]):]
    stop = free[2]
    ro = rollout(policy, PROMPTS, stop_ids=[stop], pad_id=PAD, max_new_tokens=6, temperature=0,
                 reference=ref, reward_model=rm)
    B, R = ro.responses.shape
    assert B == len(PROMPTS) and R <= 6
    for b, prompt in enumerate(PROMPTS):
        alone = generate(policy, prompt, 6, temperature=0, stop=stop).tolist()[len(prompt):]
        n = len(alone)
        assert ro.responses[b, :n].tolist() == alone
        assert ro.mask[b].tolist() == [1.0] * n + [0.0] * (R - n)
        assert bool((ro.responses[b, n:] == PAD).all())
        assert bool(ro.ended[b]) == (alone[-1] == stop)
        torch.testing.assert_close(ro.logprobs[b, :n], torch.tensor(alone_logprobs(policy, prompt, alone)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ro.ref_logprobs[b, :n], torch.tensor(alone_logprobs(ref, prompt, alone)),
                                   atol=1e-5, rtol=0)
        assert bool((ro.logprobs[b, n:] == 0).all()) and bool((ro.ref_logprobs[b, n:] == 0).all())
        with torch.no_grad():
            alone_scores = rm(torch.tensor([prompt + alone]))[0]
        assert float(ro.scores[b]) == pytest.approx(float(alone_scores[-1]), abs=1e-5)
        values = response_values(rm, ro)
        torch.testing.assert_close(values[b, :n], alone_scores[len(prompt) - 1: len(prompt) - 1 + n],
                                   atol=1e-5, rtol=0)
    assert bool(ro.ended[0]) and ro.lengths[0] == free.index(stop) + 1
    sequences = ro.sequences
    for b, prompt in enumerate(PROMPTS):
        n = int(ro.lengths[b])
        assert sequences[b, : len(prompt) + n].tolist() == prompt + ro.responses[b, :n].tolist()
        assert bool((sequences[b, len(prompt) + n:] == PAD).all())


def test_missing_eos_penalty_only_hits_responses_that_did_not_end():
    policy, rm = tiny("llama", 0), tiny("llama", 2, head="scalar")
    free = generate(policy, PROMPTS[0], 6, temperature=0).tolist()[len(PROMPTS[0]):]
    kwargs = dict(stop_ids=[free[1]], pad_id=PAD, max_new_tokens=6, temperature=0, reward_model=rm)
    plain = rollout(policy, PROMPTS, **kwargs)
    penalised = rollout(policy, PROMPTS, missing_eos_penalty=2.5, **kwargs)
    assert bool(plain.ended.any()) and not bool(plain.ended.all())
    expected = plain.scores - 2.5 * (~plain.ended).float()
    torch.testing.assert_close(penalised.scores, expected)


def test_sampled_rollouts_are_seeded_and_select_minibatches():
    policy = tiny("gpt2", 0)
    kwargs = dict(stop_ids=[3], pad_id=PAD, max_new_tokens=8, temperature=1.0)
    a = rollout(policy, PROMPTS, seed=7, **kwargs)
    b = rollout(policy, PROMPTS, seed=7, **kwargs)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.logprobs, b.logprobs)
    part = a.select(torch.tensor([2, 0]))
    assert torch.equal(part.responses, a.responses[[2, 0]])
    assert torch.equal(part.prompt_lengths, a.prompt_lengths[[2, 0]])
    assert part.scores is None
    # The sampled tokens' log-probs are real log-probabilities of the raw distribution.
    assert bool((a.logprobs[a.mask.bool()] < 0).all())


def test_a_prompt_longer_than_the_context_is_a_one_line_model_error():
    policy = tiny("gpt2", 0)
    with pytest.raises(ModelError, match="context") as info:
        rollout(policy, [[5] * 40, [6]], stop_ids=[3], pad_id=PAD, max_new_tokens=4)
    assert "\n" not in str(info.value)


def test_prompt_stream_visits_every_prompt_once_per_epoch_and_is_a_function_of_the_index():
    stream = PromptStream(10, 4, seed=3)
    first_epoch = stream.batch(0) + stream.batch(1) + stream.batch(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert PromptStream(10, 4, seed=3).batch(5) == stream.batch(5)
    assert stream.batch(0) != PromptStream(10, 4, seed=4).batch(0)


def test_minibatch_queue_holds_epochs_of_shuffled_micro_batches():
    queue = MinibatchQueue()
    queue.fill(8, epochs=2, num_minibatches=2, accum=2, seed=0)
    items = [queue.next_batch() for _ in range(8)]
    assert queue.empty and all(len(i) == 2 for i in items)
    assert sorted(torch.cat(items[:4]).tolist()) == list(range(8))
    assert sorted(torch.cat(items[4:]).tolist()) == list(range(8))
    with pytest.raises(ConfigError, match="multiple of 4"):
        queue.fill(6, epochs=1, num_minibatches=2, accum=2, seed=0)


def tempered_logprobs(model, ro, temperature: float) -> torch.Tensor:
    """[B, R] log softmax(logits / temperature) of each response token from a padded full forward."""
    with torch.no_grad():
        logits = model(ro.sequences[:, :-1]).float() / temperature
    picked = logits.log_softmax(-1).gather(-1, ro.sequences[:, 1:, None]).squeeze(-1)
    return picked.gather(1, ro.columns.clamp(max=picked.shape[1] - 1)) * ro.mask


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_equal_a_full_forward_at_the_sampling_temperature(temperature):
    policy, ref = tiny("llama", 0), tiny("llama", 1)
    kwargs = dict(stop_ids=[3, 4], pad_id=PAD, max_new_tokens=8, temperature=temperature, seed=5)
    ro = rollout(policy, PROMPTS, reference=ref, hidden=True, **kwargs)
    assert not bool(ro.mask.all())  # some row ended early: padding is covered too
    # The old policy's log-probs come from the sampler, the reference's from a packed forward: both are
    # the tempered distribution the tokens were drawn from, as a padded full forward computes it.
    torch.testing.assert_close(ro.logprobs, tempered_logprobs(policy, ro, temperature), atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.ref_logprobs, tempered_logprobs(ref, ro, temperature), atol=1e-5, rtol=0)
    # The same tokens as plain generation with the same seed.
    out = generate(policy, PROMPTS, 8, temperature=temperature, seed=5, stop=[3, 4], pad_id=PAD)
    assert torch.equal(out[:, : ro.sequences.shape[1]], ro.sequences)
    # The hidden states that drew each token: the full forward's at the predicting positions.
    with torch.no_grad():
        full = policy(ro.sequences[:, :-1], output="hidden")
    columns = ro.columns.clamp(max=full.shape[1] - 1)
    expected = full.gather(1, columns[..., None].expand(-1, -1, full.shape[-1])) * ro.mask[..., None]
    torch.testing.assert_close(ro.hidden, expected, atol=1e-5, rtol=0)


SHARED = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 8, 9], [19], [5, 6, 7, 8, 9], [12, 13, 14, 15, 16, 17, 18],
          [10, 11]]


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "llama-gqa"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_forwards_equal_padded_ones(flavour, impl):
    policy, rm = tiny(flavour, 0), tiny(flavour, 2, head="scalar")
    policy.attn_impl = rm.attn_impl = impl
    ro = rollout(policy, SHARED, stop_ids=[3], pad_id=PAD, max_new_tokens=7, seed=2)
    assert not bool(ro.mask.all())
    distinct = {tuple(p) for p in SHARED}
    for read in ("predictions", "last"):
        packed = pack(ro, read)
        # No padding, and each distinct prompt laid out once: prompt[:-1] per prompt, then one segment
        # [prompt[-1], response (without its last token unless read="last")] per response.
        assert packed.idx.shape == (1, sum(len(p) - 1 for p in distinct) + int(ro.lengths.sum())
                                    + (read == "last") * len(SHARED))
        with torch.no_grad():
            if read == "last":
                padded = rm(ro.sequences)[torch.arange(len(SHARED)), ro.prompt_lengths + ro.lengths - 1]
                torch.testing.assert_close(last_token_scores(rm, ro, packed), padded, atol=1e-5, rtol=0)
                continue
            torch.testing.assert_close(response_logprobs(policy, ro, 0.8, packed),
                                       tempered_logprobs(policy, ro, 0.8), atol=1e-5, rtol=0)
            padded_values = at_response(rm(ro.sequences[:, :-1]), ro) * ro.mask
            torch.testing.assert_close(response_values(rm, ro, packed), padded_values, atol=1e-5, rtol=0)
            # Only the outputs asked for come back: one per response token.
            assert rm(packed.idx, layout=packed.layout).shape == (1, int(ro.lengths.sum()))
            # Rows that read a whole prompt and rows that read only their response attend in groups of
            # their own sizes.
            assert len(packed.layout.groups) > 1


def test_packed_gradients_equal_padded_ones():
    policy = tiny("llama", 0).train()
    ro = rollout(policy, SHARED, stop_ids=[3], pad_id=PAD, max_new_tokens=7, seed=2)
    weights = torch.linspace(-1, 1, ro.mask.numel()).view_as(ro.mask)

    def grads(logprobs):
        policy.zero_grad()
        (logprobs * weights).sum().backward()
        return [p.grad.clone() for p in policy.parameters()]

    padded = policy(ro.sequences[:, :-1], targets=ro.sequences[:, 1:], output="logprobs")
    expected = grads(padded.gather(1, ro.columns.clamp(max=padded.shape[1] - 1)) * ro.mask)
    got = grads(response_logprobs(policy, ro, 1.0, pack(ro)))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_a_ragged_layout_refuses_an_input_of_another_shape():
    model = tiny("gpt2", 0)
    layout = RaggedLayout.build([0, 1, 2], [([0, 1, 2], [0, 1, 2])])
    model(torch.tensor([[5, 6, 7]]), layout=layout)
    with pytest.raises(ModelError, match="ragged layout") as info:
        model(torch.tensor([[5, 6]]), layout=layout)
    assert "\n" not in str(info.value)
