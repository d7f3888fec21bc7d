"""Continuous batching for serving: iteration-level scheduling over a paged KV pool with prefix caching.

    from llmlab.infer.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer, kv_budget_bytes=None, block_size=16, max_running=64, prefill_chunk=256)
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0, stop=["\\n\\n"]))
    for out in handle: ...          # StepOutput(token_ids, text, logprobs, finish_reason)
    engine.start(); ...; engine.stop()      # background stepping; `async for out in handle` in asyncio

Modules: blocks.py (block pool, reservations, prefix cache), paged.py (the KV tensors and the cache object the
model attends through), scheduler.py (admission, chunked prefill), text.py (streamed text and stop strings),
handle.py (thread-safe output streams), engine.py (the step loop, sampling, the background thread).
"""

from llmlab.infer.engine.engine import Engine, EngineFull
from llmlab.infer.engine.handle import EngineError, RequestHandle
from llmlab.infer.engine.params import SamplingParams, StepOutput

__all__ = ["Engine", "EngineError", "EngineFull", "RequestHandle", "SamplingParams", "StepOutput"]
