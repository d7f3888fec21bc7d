"""Iteration-level scheduling (Orca, Yu et al. 2022) over the block pool.

Every engine step the scheduler
  1. admits waiting requests, first come first served, while fewer than max_running run and the pool can
     reserve all the blocks a request may need (its cached prefix blocks are shared, not reserved again);
  2. plans the step: one decode token for every running request whose prompt is done, and prompt chunks for
     the others within a budget of prefill_chunk tokens, oldest first (chunked prefill: a long prompt is
     spread over several steps instead of stalling the decodes). Before a prompt's next chunk, blocks cached
     since its admission that continue it are shared instead of computed: requests admitted together with a
     common prefix reuse it as soon as the first of them has computed it;
  3. after the forwards, registers newly completed blocks in the prefix cache, and retires finished requests,
     whose blocks go back to the pool at once.
No step waits for the batch to drain: a request that finishes leaves, and the next waiting one joins.

The peers continuous batching is measured against (benchmarks/bench_serve.py) are request-level policies:
a batch of up to max_running waiting requests is admitted only when none runs, and nothing joins it until
its last request is done.
  policy="static" is request-level batching as Orca (Yu et al. 2022) describes it and as FasterTransformer,
     transformers' generate and llmlab.infer.stream do it: a request that finishes keeps its row in the
     batch as padding (its stream ends at once, but its row is still computed every decode step, on a
     dummy input whose outputs are discarded, and its blocks stay held) until the batch's longest request
     is done; then the whole batch's blocks go back to the pool and the next batch is admitted.
  policy="static_shrinking" is a stronger variant, reported beside it: a finished request leaves the
     batch at once (no padded rows, its blocks freed), but still nothing joins until the batch has drained.
Cancelled and failed requests leave at once under every policy. Everything else (paged KV, chunked
prefill, prefix caching, sampling) is the same.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmlab.infer.engine.blocks import BlockPool, block_key
from llmlab.infer.engine.params import SamplingParams
from llmlab.infer.engine.text import TextStream


class Request:
    """One request's state: its tokens, how many have keys/values in the pool, its block table."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, max_tokens: int,
                 handle, generator, tokenizer):
        self.id, self.prompt, self.params, self.max_tokens = request_id, prompt, params, max_tokens
        self.handle, self.generator = handle, generator
        self.tokens = list(prompt)
        self.computed = 0  # leading tokens whose keys/values are in the pool
        self.table: list[int] = []
        self.reserved = 0  # blocks reserved but not yet taken
        self.keys: list[bytes] = []  # prefix-cache keys of the leading full blocks
        self.registered = 0  # leading blocks offered to the prefix cache
        self.generated = 0
        self.cancel_requested = False
        self.padding = False  # finished, but its row stays in a static batch until the batch is done
        self.text = TextStream(tokenizer, params.stop)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    def blocks_needed(self, block_size: int) -> int:
        """Blocks for every position that gets keys/values: the prompt and all but the last new token."""
        return -(-(len(self.prompt) + self.max_tokens - 1) // block_size)

    def key(self, i: int, block_size: int) -> bytes:
        """The prefix-cache key of full block i (keys before it computed first)."""
        while len(self.keys) <= i:
            n = len(self.keys)
            parent = self.keys[-1] if self.keys else b""
            self.keys.append(block_key(parent, self.tokens[n * block_size:(n + 1) * block_size]))
        return self.keys[i]


@dataclass
class StepPlan:
    decode: list[Request]
    prefill: list[tuple[Request, int]]  # (request, number of prompt tokens this step)


POLICIES = ("continuous", "static", "static_shrinking")


class Scheduler:
    def __init__(self, pool: BlockPool, max_running: int, prefill_chunk: int, prefix_caching: bool = True,
                 policy: str = "continuous"):
        self.pool, self.max_running, self.prefill_chunk = pool, max_running, prefill_chunk
        self.prefix_caching, self.policy = prefix_caching, policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_hit_blocks = 0

    def admit(self) -> None:
        if self.policy != "continuous" and self.running:
            return  # the running batch drains first
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            # The last prompt token is always computed: its logits give the first new token.
            reusable = (len(req.prompt) - 1) // bs if self.prefix_caching else 0
            shared = self.pool.cached_prefix([req.key(i, bs) for i in range(reusable)])
            new = req.blocks_needed(bs) - len(shared)
            if not self.pool.can_admit(new, shared):
                return  # first come, first served: later requests wait too
            self.waiting.popleft()
            self.pool.admit(new, shared)
            req.table, req.reserved = list(shared), new
            req.computed, req.registered = len(shared) * bs, len(shared)
            self.prefix_hit_blocks += len(shared)
            self.running.append(req)

    def plan(self) -> StepPlan:
        decode = [r for r in self.running if not r.prefilling]
        prefill, budget = [], self.prefill_chunk
        for req in self.running:
            if req.prefilling and budget > 0:
                self.share_cached(req)
                n = self.chunk(req, budget)
                if n == 0:
                    break
                prefill.append((req, n))
                budget -= n
        return StepPlan(decode, prefill)

    def chunk(self, req: Request, budget: int) -> int:
        """Prompt tokens to compute now: all that is left if the budget allows, else up to a block boundary
        (so the next chunk can start on blocks another request has cached meanwhile); 0 to wait a step.
        A whole step's budget that reaches no boundary is taken as it is: every step makes progress."""
        left = len(req.prompt) - req.computed
        if left <= budget:
            return left
        bs = self.pool.block_size
        aligned = (req.computed + budget) // bs * bs - req.computed
        if aligned > 0:
            return aligned
        return budget if budget == self.prefill_chunk else 0

    def share_cached(self, req: Request) -> None:
        """Extend a prompt's table with cached blocks that continue it (when it ends on a block boundary)."""
        bs = self.pool.block_size
        if not self.prefix_caching or req.computed != len(req.table) * bs:
            return
        reusable = (len(req.prompt) - 1) // bs
        shared = self.pool.cached_prefix([req.key(i, bs) for i in range(len(req.table), reusable)])
        if shared:
            self.pool.share(shared)
            self.pool.reserved -= len(shared)  # these no longer come out of the request's reservation
            req.table += shared
            req.reserved -= len(shared)
            req.computed, req.registered = len(req.table) * bs, len(req.table)
            self.prefix_hit_blocks += len(shared)

    def grow(self, req: Request, n: int) -> None:
        """Take reserved blocks until the table covers the next n positions."""
        while len(req.table) * self.pool.block_size < req.computed + n:
            req.table.append(self.pool.take())
            req.reserved -= 1

    def register_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        while self.prefix_caching and req.registered < req.computed // bs:
            self.pool.register(req.table[req.registered], req.key(req.registered, bs))
            req.registered += 1

    def finish(self, req: Request) -> None:
        """A request is done: it leaves now, or under policy="static" stays as a padding row until every
        request of its batch is done (module docstring)."""
        if self.policy == "static":
            req.padding = True
            self._release_drained_batch()
        else:
            self.retire(req)

    def retire(self, req: Request) -> None:
        """Return a cancelled or failed (or, unless padded, finished) request's blocks and reservation."""
        if req in self.running:
            self._leave(req)
            self._release_drained_batch()
        elif req in self.waiting:
            self.waiting.remove(req)

    def _leave(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.table, req.reserved)
        req.table, req.reserved = [], 0

    def _release_drained_batch(self) -> None:
        """Once only padding rows run, the static batch is done: every row leaves."""
        if self.running and all(r.padding for r in self.running):
            for req in list(self.running):
                self._leave(req)
