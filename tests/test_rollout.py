"""llmlab.align.rollout: batched rollouts over ragged prompts give, row by row, what each prompt alone gives:
the same greedy response, the same log-probs and values, and the reward-model score at the last real token."""

from __future__ import annotations

import pytest
import torch

from llmlab.align.rollout import MinibatchQueue, PromptStream, response_values, rollout
from llmlab.errors import ConfigError, ModelError
from llmlab.infer import generate
from llmlab.model import ModelConfig, Transformer

VOCAB, PAD = 48, 0


def tiny(flavour: str, seed: int, head: str = "lm") -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(flavour, "tiny", vocab_size=VOCAB, block_size=32, d_model=32, n_layer=2,
                             n_head=2, head=head)
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
