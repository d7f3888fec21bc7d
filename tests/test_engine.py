"""The continuous-batching engine: greedy outputs equal llmlab.infer.generate's whether a request runs alone
or among 50 others, prefix caching and chunked prefill change no output, the block pool empties after finish,
cancel and failure, admission waits for memory, stop strings/ids, seeds, logprobs, quantized models, threads.

Margins: the tiny models' LM heads are scaled by 5 (as in test_generate.py), so greedy picks are far from ties
and batched SDPA/matmuls that differ from a single-row run in the last bits cannot flip an argmax.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from llmlab.errors import ConfigError, LLMLabError, ModelError
from llmlab.infer import generate
from llmlab.infer.engine import Engine, EngineError, EngineFull, SamplingParams
from llmlab.infer.engine.paged import KVPool
from llmlab.model import ModelConfig, Transformer

FLAVOURS = {"gpt2": dict(), "llama": dict(n_kv_head=2)}


def tiny(flavour: str = "gpt2", vocab_size: int = 256) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(flavour, "tiny", block_size=128, vocab_size=vocab_size, **FLAVOURS[flavour])
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model


def reference(model, prompt, n, **options) -> list[int]:
    out = generate(model, prompt, n, temperature=options.pop("temperature", 0), **options)
    return out.tolist()[len(prompt):]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def mixed_requests(count: int, seed: int = 0, vocab: int = 256) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 60))], rng.randint(1, 30))
            for _ in range(count)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fifty_mixed_requests_match_generate_alone(flavour):
    model = tiny(flavour)
    requests = mixed_requests(50)
    engine = Engine(model, block_size=8, prefill_chunk=64)
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    busiest = 0
    while engine.step():
        busiest = max(busiest, engine.stats()["running"])
    assert busiest > 20  # they really ran together
    for (prompt, n), handle in zip(requests, handles, strict=True):
        out = handle.result()
        assert out.token_ids == reference(model, prompt, n)
        assert out.finish_reason == "length" and handle.num_generated == n
    assert engine.stats()["blocks_used"] == 0


def test_one_request_alone_and_requests_joining_mid_flight():
    model = tiny("llama")
    engine = Engine(model, block_size=4, max_running=3)
    requests = mixed_requests(7, seed=1)
    handles = [engine.submit(p, greedy(n)) for p, n in requests[:2]]
    engine.step()
    handles += [engine.submit(p, greedy(n)) for p, n in requests[2:]]  # join while others decode
    for (prompt, n), handle in zip(requests, handles, strict=True):
        assert handle.result().token_ids == reference(model, prompt, n)
    assert engine.stats()["running"] == 0 and engine.stats()["blocks_used"] == 0


def run_recording_batches(policy: str, requests):
    """Outputs, the ids running after each step, the blocks in use after each step and the step at which
    each request's stream ended, of requests[:3] submitted first and the rest after one step, on an engine
    with 3 slots."""
    engine = Engine(tiny("llama"), block_size=8, max_running=3, policy=policy)
    handles = [engine.submit(p, greedy(n)) for p, n in requests[:3]]
    engine.step()
    handles += [engine.submit(p, greedy(n)) for p, n in requests[3:]]
    batches, blocks, ended = [], [], {}
    while engine.step():
        batches.append({r.id for r in engine.scheduler.running})
        blocks.append(engine.pool.used)
        ended.update({h.request_id: len(batches) - 1 for h in handles
                      if h.done and h.request_id not in ended})
    assert engine.pool.used == 0 and engine.stats()["running"] == 0
    return [h.result().token_ids for h in handles], batches, blocks, ended


FIRST, LATER = {0, 1, 2}, {3, 4}  # mixed_requests(5, seed=3): outputs 24, 6, 13 then 19, 10


@pytest.mark.parametrize("policy", ["static", "static_shrinking"])
def test_request_level_policies_drain_the_batch_before_admitting_the_next(policy):
    requests = mixed_requests(5, seed=3)
    static_out, static_batches, _, _ = run_recording_batches(policy, requests)
    continuous_out, continuous_batches, _, _ = run_recording_batches("continuous", requests)
    assert static_out == continuous_out
    assert continuous_out == [reference(tiny("llama"), p, n) for p, n in requests]
    assert any(b & FIRST and b & LATER for b in continuous_batches)  # continuous: joins mid-batch
    assert not any(b & FIRST and b & LATER for b in static_batches)
    first_done = max(i for i, b in enumerate(static_batches) if b & FIRST)
    assert all(not b & LATER for b in static_batches[:first_done + 1])
    assert any(b == LATER for b in static_batches)


def test_static_policy_keeps_finished_rows_in_the_batch_until_its_longest_is_done():
    """Request-level batching (Orca's baseline): a finished request's stream ends at once, but its row and
    blocks stay in the batch until the batch's longest request is done; then the pool is empty again."""
    _, batches, blocks, ended = run_recording_batches("static", mixed_requests(5, seed=3))
    longest = ended[0]  # 24 new tokens, the first batch's longest
    assert ended[1] < ended[2] < longest  # streams end as their requests finish
    assert all(b == FIRST for b in batches[:longest])  # finished rows keep their slots
    assert blocks[:longest] == sorted(blocks[:longest])  # and their blocks: none go back meanwhile
    assert batches[longest] == set()  # the whole batch left with its longest request
    assert ended[3] > ended[4] > longest  # then the next batch ran
    _, shrinking, _, shrinking_ended = run_recording_batches("static_shrinking", mixed_requests(5, seed=3))
    assert shrinking[shrinking_ended[1]] == {0, 2}  # the variant: a finished request leaves at once


def test_chunked_prefill_keeps_decodes_going_and_changes_nothing():
    model = tiny("llama")
    engine = Engine(model, block_size=4, prefill_chunk=16)
    short, long_prompt = [5, 6, 7], list(range(1, 101))
    a = engine.submit(short, greedy(20))
    engine.step()  # a's prompt done: it decodes from now on
    b = engine.submit(long_prompt, greedy(10))
    for _ in range(3):
        engine.step()  # b takes 16 prompt tokens per step; a gets a token every step meanwhile
    b_req = engine.scheduler.running[1]
    assert b_req.id == b.request_id and b_req.computed == 48
    assert a.num_generated == 4 and b.num_generated == 0
    assert a.result().token_ids == reference(model, short, 20)
    assert b.result().token_ids == reference(model, long_prompt, 10)


def test_prefill_chunk_smaller_than_a_block_still_progresses():
    model = tiny("gpt2")
    engine = Engine(model, block_size=8, prefill_chunk=3)
    requests = mixed_requests(4, seed=2)
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    assert [h.result().token_ids for h in handles] == [reference(model, p, n) for p, n in requests]


def test_prefix_cache_reuses_blocks_and_changes_no_output():
    model = tiny("gpt2")
    system = [(7 * i + 3) % 256 for i in range(40)]
    prompts = [system + [i, i + 1, i + 2] for i in range(6)]
    engine = Engine(model, block_size=8)
    first = engine.submit(prompts[0], greedy(12)).result().token_ids
    prefilled = engine.stats()["prompt_tokens"]
    handles = [engine.submit(p, greedy(12)) for p in prompts[1:]]
    outs = [h.result().token_ids for h in handles]
    stats = engine.stats()
    assert [first, *outs] == [reference(model, p, 12) for p in prompts]
    assert stats["prefix_hits"] == 5 * 5  # 40 shared tokens = 5 full blocks of 8, for each later request
    assert stats["prompt_tokens"] - prefilled == 5 * 3  # only the 3 new tokens of each were computed
    assert stats["blocks_used"] == 0 and stats["blocks_cached"] > 0
    engine.clear_prefix_cache()  # e.g. after the weights change
    assert engine.stats()["blocks_cached"] == 0
    assert engine.submit(prompts[0], greedy(12)).result().token_ids == first
    assert engine.stats()["prefix_hits"] == stats["prefix_hits"]


def test_requests_admitted_together_share_a_prefix_once_it_is_computed():
    model = tiny("llama")
    system = [(5 * i + 1) % 256 for i in range(48)]
    prompts = [system + [i, 2 * i + 1] for i in range(5)]
    engine = Engine(model, block_size=8, prefill_chunk=56)  # step 1: all of prompt 0, no block of prompt 1
    handles = [engine.submit(p, greedy(6)) for p in prompts]
    assert [h.result().token_ids for h in handles] == [reference(model, p, 6) for p in prompts]
    stats = engine.stats()
    assert stats["prefix_hits"] == 4 * 6  # the 48 common tokens: 6 blocks for each later prompt
    assert stats["prompt_tokens"] == 50 + 4 * 2
    assert stats["blocks_used"] == 0


def test_prefix_cache_never_reuses_the_whole_prompt_and_evicts_lru():
    model = tiny("gpt2")
    prompt = list(range(16))  # exactly two blocks: the last one is recomputed for its logits
    engine = Engine(model, kv_budget_bytes=None, block_size=8)
    engine.submit(prompt, greedy(3)).result()
    again = engine.submit(prompt, greedy(3)).result()
    assert again.token_ids == reference(model, prompt, 3)
    assert engine.stats()["prefix_hits"] == 1
    budget = 5 * KVPool.bytes_per_block(model, 8)  # 4 usable blocks (block 0 is the null block)
    small = Engine(model, kv_budget_bytes=budget, block_size=8, contiguous_decode=False)  # all for the pool
    small.submit(prompt, greedy(3)).result()  # caches 2 blocks
    other = [200 + i for i in range(20)]
    assert small.submit(other, greedy(3)).result().token_ids == reference(model, other, 3)  # evicts
    assert small.stats()["blocks_used"] == 0
    assert small.submit(prompt, greedy(3)).result().token_ids == reference(model, prompt, 3)


def test_pool_empties_after_cancel_both_waiting_and_running():
    model = tiny("gpt2")
    engine = Engine(model, block_size=4, max_running=1)
    running = engine.submit([1, 2, 3], greedy(50))
    waiting = engine.submit([4, 5, 6], greedy(50))
    engine.step()
    assert engine.stats()["blocks_used"] > 0 and engine.stats()["waiting"] == 1
    running.cancel()
    waiting.cancel()
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0
    assert engine.stats()["waiting"] == 0
    assert running.result().finish_reason == "cancelled" and waiting.result().token_ids == []
    assert not engine.step()


def test_admission_waits_for_memory_and_refuses_what_never_fits():
    model = tiny("llama")
    budget = 7 * KVPool.bytes_per_block(model, 8)  # 6 usable blocks, no decode slots
    engine = Engine(model, kv_budget_bytes=budget, block_size=8, contiguous_decode=False)
    requests = [([i + 1] * 10, 14) for i in range(4)]  # 23 positions = 3 blocks each: two fit at a time
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 2
    for (prompt, n), h in zip(requests, handles, strict=True):
        assert h.result().token_ids == reference(model, prompt, n)
    assert engine.stats()["blocks_used"] == 0
    with pytest.raises(ConfigError, match="needs 8 KV blocks.*raise kv_budget_bytes"):
        engine.submit([1] * 60, greedy(4))


def test_stop_strings_and_stop_ids(small_corpus):
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.train(small_corpus, vocab_size=300, progress=False, workers=1)
    model = tiny("gpt2", vocab_size=tok.vocab_size)
    engine = Engine(model, tok, block_size=8)
    prompt = tok.encode("The quick brown fox")
    full = reference(model, prompt, 40)
    text = tok.decode(full)
    stop = text[10:13]
    pieces = list(engine.submit(prompt, greedy(40, stop=[stop, "\x00never"])))
    cut = text[:text.index(stop)]
    assert "".join(o.text for o in pieces) == cut and pieces[-1].finish_reason == "stop"
    assert tok.decode(full[:len(sum((o.token_ids for o in pieces), []))]).startswith(cut + stop[:1])

    stop_id = full[7]
    out = engine.submit(prompt, greedy(40, stop_token_ids=[stop_id])).result()
    n = full.index(stop_id) + 1
    assert out.token_ids == full[:n] and out.finish_reason == "stop"
    assert out.text == tok.decode(full[:n - 1])  # the stop token is kept in ids, left out of the text
    assert engine.submit(prompt, greedy(5)).result().text == tok.decode(full[:5])
    assert engine.stats()["blocks_used"] == 0


def test_seeds_reproducible_alone_and_in_a_batch_and_equal_to_generate():
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.div_(5)  # flatter distributions: sampling really varies
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    engine = Engine(model, block_size=4)
    alone = engine.submit(prompt, params).result().token_ids
    crowd = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.8, seed=i))
             for i, (p, n) in enumerate(mixed_requests(8, seed=3))]
    again = engine.submit(prompt, params)
    assert again.result().token_ids == alone
    assert all(h.result().finish_reason == "length" for h in crowd)
    expected = reference(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    assert alone == expected
    other = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7))
    assert other.result().token_ids != alone


def test_logprobs_and_prompt_logprobs_equal_the_models_own():
    model = tiny("gpt2")
    engine = Engine(model, block_size=8)
    prompt = [9, 8, 7, 6, 5]
    out = engine.submit(prompt, greedy(6, logprobs=3)).result()
    seq = prompt + out.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([seq]))[0].log_softmax(-1)
    for i, entry in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + i]
        assert entry["token_id"] == out.token_ids[i]
        assert entry["logprob"] == pytest.approx(float(row[out.token_ids[i]]), abs=1e-4)
        top_ids = row.topk(3).indices.tolist()
        assert list(entry["top"]) == top_ids and next(iter(entry["top"])) == entry["token_id"]
    scores = engine.prompt_logprobs(seq)
    assert scores[0] is None
    expected = [float(logp[i, seq[i + 1]]) for i in range(len(seq) - 1)]
    assert scores[1:] == pytest.approx(expected, abs=1e-5)
    detailed = engine.prompt_logprobs(seq, top=2)
    assert detailed[0] is None and len(detailed[1]["top"]) == 2
    assert detailed[3]["logprob"] == pytest.approx(expected[2], abs=1e-5)
    assert engine.submit(prompt, greedy(3, logprobs=0)).result().logprobs[0]["top"] == {}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint(tmp_path, bits):
    from llmlab.infer.quant import load_model, quantize

    quantize(tiny("llama"), "rtn", bits, 32, progress=False).save(tmp_path / "q")
    model = load_model(tmp_path / "q")
    engine = Engine(model, block_size=8)
    requests = mixed_requests(6, seed=bits)
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    for (prompt, n), h in zip(requests, handles, strict=True):
        assert h.result().token_ids == reference(model, prompt, n)


def test_background_thread_async_clients_and_cancel():
    model = tiny("gpt2")
    engine = Engine(model, block_size=8)
    requests = mixed_requests(8, seed=5)

    async def collect(prompt, n):
        tokens = []
        async for out in engine.submit(prompt, greedy(n)):
            tokens += out.token_ids
        return tokens

    async def cancel_after_first():
        handle = engine.submit([1, 2, 3], greedy(100))
        reasons = []
        async for out in handle:
            handle.cancel()
            reasons.append(out.finish_reason)
        assert reasons[0] is None and reasons[-1] == "cancelled"
        return handle

    async def main():
        return await asyncio.gather(cancel_after_first(), *(collect(p, n) for p, n in requests))

    engine.start()
    try:
        cancelled, *outs = asyncio.run(main())
        assert outs == [reference(model, p, n) for p, n in requests]
        assert cancelled.finish_reason == "cancelled" and cancelled.num_generated < 100
        assert [out.token_ids for out in engine.submit([4, 2], greedy(5))] == [[t] for t in
                                                                               reference(model, [4, 2], 5)]
    finally:
        engine.stop()
    assert engine.stats()["blocks_used"] == 0


def test_stop_cancels_what_is_left_and_a_failing_forward_fails_only_its_requests():
    model = tiny("gpt2")
    engine = Engine(model, block_size=8)
    poison = 255

    def refuse(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned token")

    hook = model.tok_emb.register_forward_pre_hook(refuse)
    try:
        bad = engine.submit([1, poison, 2], greedy(5))
        good = engine.submit([1, 2, 3], greedy(5))
        with pytest.raises(EngineError, match="poisoned token"):
            bad.result()
        assert good.result().token_ids == reference(model, [1, 2, 3], 5)
    finally:
        hook.remove()
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["requests_failed"] == 1
    left = engine.submit([1, 2, 3], greedy(50))
    engine.start()
    engine.stop()
    assert left.result().finish_reason in ("cancelled", "length")
    assert engine.stats()["blocks_used"] == 0


@pytest.mark.parametrize("call, fragment", [
    (lambda e: e.submit([], greedy(3)), "prompt is empty"),
    (lambda e: e.submit([1, 999], greedy(3)), "outside the model's vocabulary"),
    (lambda e: e.submit("hello", greedy(3)), "list of token ids"),
    (lambda e: e.submit(7, greedy(3)), "list of token ids"),
    (lambda e: Engine(e.model, max_running=0), "max_running=0"),
    (lambda e: e.submit([1] * 100, greedy(40)), "exceeds the model's context"),
    (lambda e: e.submit([1], greedy(3, stop=["x"])), "needs the engine to have a tokenizer"),
    (lambda e: SamplingParams(temperature=-1), "temperature"),
    (lambda e: SamplingParams(max_tokens=-2), "max_tokens"),
    (lambda e: SamplingParams(stop=[""]), "stop"),
    (lambda e: SamplingParams(stop=5), "stop=5"),
    (lambda e: SamplingParams(stop_token_ids="ab"), "stop_token_ids"),
    (lambda e: SamplingParams(logprobs=True), "logprobs"),
    (lambda e: Engine(e.model, draft=e.model), "speculative decoding is not supported"),
    (lambda e: Engine(e.model, kv_budget_bytes=10), "kv_budget_bytes=10"),
    (lambda e: Engine(e.model, policy="fifo"), "policy='fifo'"),
])
def test_bad_input_one_line(call, fragment):
    engine = Engine(tiny("gpt2"), block_size=8)
    with pytest.raises(LLMLabError) as info:
        call(engine)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_params_normalise_stop_fields():
    params = SamplingParams(stop="\n", stop_token_ids=None)
    assert params.stop == ("\n",) and params.stop_token_ids == ()
    assert SamplingParams(stop=None, stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_queue_limit_and_max_tokens_zero():
    engine = Engine(tiny("gpt2"), block_size=8, max_waiting=2)
    engine.submit([1], greedy(2))
    engine.submit([2], greedy(2))
    with pytest.raises(EngineFull, match="max_waiting=2"):
        engine.submit([3], greedy(2))
    empty = engine.submit([4], greedy(0)).result()
    assert empty.token_ids == [] and empty.finish_reason == "length"
    with pytest.raises(ModelError):
        engine.submit([1] * 129, greedy(0))


@pytest.mark.parametrize("mode", ["slots", "gather", "over_budget"])
def test_decode_slots_change_no_output(mode):
    """Decoding from contiguous per-request slots (compacted as requests leave and join), from the pool's
    blocks, or falling back to the blocks when the slots would exceed their budget: the same greedy tokens."""
    model = tiny("llama")
    requests = mixed_requests(20, seed=3)
    engine = Engine(model, block_size=8, max_running=6, prefill_chunk=32, contiguous_decode=mode != "gather")
    if mode == "over_budget":
        engine.slots.budget = 0
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    outs = [h.result().token_ids for h in handles]
    assert outs == [reference(model, p, n) for p, n in requests]
    assert engine.pool.used == 0
    if mode == "slots":
        assert engine.slots.rows > 0 and not engine._slotted  # used, and every request left its slot
    elif mode == "over_budget":
        assert engine.slots.rows == 0


def test_static_batch_leaves_when_its_last_live_request_is_cancelled():
    engine = Engine(tiny("gpt2"), block_size=8, max_running=2, policy="static")
    short, long = engine.submit([1, 2, 3], greedy(2)), engine.submit([4, 5, 6], greedy(40))
    waiting = engine.submit([7, 8], greedy(3))
    while not short.done:
        engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1  # short pads the batch
    long.cancel()
    assert engine.stats()["running"] == 0 and engine.pool.used == 0  # the padding row left with it
    assert short.result().finish_reason == "length" and long.result().finish_reason == "cancelled"
    assert waiting.result().token_ids == reference(tiny("gpt2"), [7, 8], 3)


@pytest.mark.parametrize("budget_blocks", [None, 40])
def test_pool_and_decode_slots_stay_within_the_kv_budget(budget_blocks):
    """The decode slots' memory comes out of kv_budget_bytes: pool + slots never exceed it (without a budget:
    room for max_running whole contexts in each), and outputs stay those of generate."""
    model = tiny("llama")
    per_block = KVPool.bytes_per_block(model, 8)
    budget = None if budget_blocks is None else budget_blocks * per_block
    engine = Engine(model, kv_budget_bytes=budget, block_size=8, max_running=4, prefill_chunk=32)
    pool_bytes = engine.kv.k.nbytes + engine.kv.v.nbytes
    whole_context = 4 * (128 // 8) * per_block  # max_running rows of the model's context
    if budget is None:
        assert pool_bytes == whole_context + per_block and engine.slots.budget == whole_context
    else:
        assert engine.slots.budget == budget // 2 and pool_bytes + engine.slots.budget <= budget
    requests = mixed_requests(8, seed=5)
    handles = [engine.submit(p, greedy(n)) for p, n in requests]
    peak = 0
    while engine.step():
        peak = max(peak, 0 if engine.slots.k is None else engine.slots.k.nbytes + engine.slots.v.nbytes)
    assert [h.result().token_ids for h in handles] == [reference(model, p, n) for p, n in requests]
    assert 0 < peak <= engine.slots.budget
