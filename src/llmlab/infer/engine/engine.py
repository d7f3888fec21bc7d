"""The continuous-batching engine: requests in, streamed tokens out, one model forward group per step.

    from llmlab.infer.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer, kv_budget_bytes=2**28)
    handle = engine.submit(tok.encode("Once upon"), SamplingParams(max_tokens=32, temperature=0))
    for out in handle: print(out.text, end="")            # or `async for` with engine.start()

A step (scheduler.py) runs one forward over the decode token of every running request whose prompt is done
(reading contiguous per-request copies of their keys/values, paged.DecodeSlots, or else gathering them from
their block tables) and padded multi-row forwards over
the step's prompt chunks (prefill_groups), then samples each request with its own settings. Rows never mix:
each attends only to its own keys, at its own positions, so a request's tokens do not depend on what else
runs (up to the last bits of a batched matmul; the tests compare greedy outputs with llmlab.infer.generate
on a model with clear margins).

Threads: start() runs steps on a background thread while there is work; submit(), cancel() and the handles
are safe to use from other threads and from asyncio. One lock covers a step, so cancel() from another
thread frees the request's blocks at once when the engine is idle, else at the end of the current step.
A forward that raises is retried row by row, and fails only the request that causes it (its handle raises
EngineError); the engine goes on. prompt_logprobs() takes the same lock: from asyncio, call it in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque

import torch

from llmlab.errors import ConfigError, LLMLabError, ModelError
from llmlab.infer.engine.blocks import BlockPool
from llmlab.infer.engine.handle import RequestHandle, notify_waiters
from llmlab.infer.engine.paged import DecodeSlots, KVPool, PagedBatch, SlotBatch
from llmlab.infer.engine.params import SamplingParams, StepOutput
from llmlab.infer.engine.scheduler import POLICIES, Request, Scheduler
from llmlab.infer.sampling import next_token, seeded_generator

log = logging.getLogger(__name__)
CPU_DEFAULT_BUDGET = 2**30  # the pool is zeroed up front: keep the default modest in host memory


class EngineFull(LLMLabError):
    """The waiting queue is at max_waiting; retry later."""


class Engine:
    """Continuous batching over a paged KV pool (module docstring).

    kv_budget_bytes: memory for keys and values, the block pool and the decode slots together (None: room
    for max_running requests of the model's whole context in each, so admission never waits for memory; at
    most 1 GiB on CPU; split_kv_budget). block_size: tokens per KV block.
    max_running: requests decoded together. prefill_chunk: prompt tokens processed per step. max_waiting:
    queued requests beyond which submit raises EngineFull (None: no limit). prefix_caching: reuse cached
    prompt-prefix blocks. contiguous_decode: decode from contiguous per-request copies of the keys/values
    (paged.DecodeSlots, their memory taken from kv_budget_bytes) instead of gathering blocks every step.
    policy: "continuous" (requests join and leave at every step), or a request-level peer to compare with
    (scheduler.py): "static" (Orca's request-level batching: a batch is admitted only when none runs, and
    its finished requests' rows are still computed, as padding, until its longest request is done) or
    "static_shrinking" (the same, but finished requests leave the batch at once).
    draft: speculative decoding is refused (ConfigError).
    """

    def __init__(self, model, tokenizer=None, kv_budget_bytes: int | None = None, block_size: int = 16,
                 max_running: int = 64, prefill_chunk: int = 256, *, max_waiting: int | None = None,
                 prefix_caching: bool = True, contiguous_decode: bool = True, policy: str = "continuous",
                 draft=None):
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r} is not a scheduling policy; use one of {list(POLICIES)}")
        if draft is not None:
            raise ConfigError("speculative decoding is not supported by the batching engine; serve without "
                              "a draft model (llmlab generate --draft speculates for single prompts)")
        for name, value in (("block_size", block_size), ("max_running", max_running),
                            ("prefill_chunk", prefill_chunk), ("kv_budget_bytes", kv_budget_bytes),
                            ("max_waiting", max_waiting)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        per_block = KVPool.bytes_per_block(model, block_size)
        cpu = next(model.parameters()).device.type == "cpu"
        context_blocks = -(-model.config.block_size // block_size)
        num_blocks, slots_bytes = split_kv_budget(kv_budget_bytes, per_block, max_running, context_blocks,
                                                  contiguous_decode, cpu)
        if num_blocks < 2:
            raise ConfigError(f"kv_budget_bytes={kv_budget_bytes} holds fewer than 2 KV blocks of "
                              f"{per_block} bytes (block_size={block_size}) beside the decode slots; give "
                              f"at least {4 * per_block} bytes")
        self.pool = BlockPool(num_blocks, block_size)
        self.kv = KVPool(model, num_blocks, block_size)
        self.slots = (DecodeSlots(self.kv, max_running, model.config.block_size, slots_bytes)
                      if contiguous_decode else None)
        self._slotted: list[Request] = []  # decoding requests by slot (row of self.slots)
        self.scheduler = Scheduler(self.pool, max_running, prefill_chunk, prefix_caching, policy)
        self._lock = threading.Lock()  # held for a whole step (and prompt_logprobs' forward)
        self._wake = threading.Condition()  # guards the inbox; wakes the engine thread
        self._inbox: deque[Request] = deque()
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stepping: int | None = None  # the thread inside step(): its handles' wake-ups wait for the end
        self._wakeups: list = []
        self._stopping = False
        self.counters = dict(steps=0, prompt_tokens=0, tokens_generated=0,
                             requests_finished=0, requests_failed=0)

    # ----- requests -----
    def submit(self, prompt_ids, params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; returns its handle. ModelError/ConfigError for a request that can never run,
        EngineFull when max_waiting requests already wait."""
        params = SamplingParams() if params is None else params
        prompt = self._check_prompt(prompt_ids)
        room = self.model.config.block_size - len(prompt)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ModelError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                             f"model's context of {self.model.config.block_size} tokens; ask for at most "
                             f"{room} new tokens or shorten the prompt")
        if params.stop and self.tokenizer is None:
            raise ConfigError(f"stop={list(params.stop)} needs the engine to have a tokenizer; pass one to "
                              "Engine or use stop_token_ids")
        rid = next(self._ids)
        handle = RequestHandle(self, rid, prompt)
        generator = seeded_generator(params.seed, params.temperature, self.kv.device)
        req = Request(rid, prompt, params, max_tokens, handle, generator, self.tokenizer)
        needed = req.blocks_needed(self.pool.block_size)
        if needed > self.pool.capacity:
            raise ConfigError(f"the request needs {needed} KV blocks ({len(prompt)} prompt + {max_tokens} "
                              f"new tokens) but the pool holds {self.pool.capacity}; raise kv_budget_bytes "
                              "or lower max_tokens")
        if max_tokens == 0:
            handle._put(StepOutput([], "", [] if params.logprobs is not None else None, "length"))
            return handle
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise EngineFull(f"{self.num_waiting} requests are already waiting (max_waiting="
                             f"{self.max_waiting}); retry later")
        with self._wake:
            self._requests[rid] = req
            self._inbox.append(req)
            self._wake.notify_all()
        return handle

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
            raise ModelError("the prompt must be a list of token ids (ints); encode text with the tokenizer "
                             "first")
        prompt = list(prompt_ids)
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ModelError("the prompt is empty; give at least one token (e.g. the tokenizer's eos/bos id)")
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise ModelError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab}); "
                             "encode the prompt with the tokenizer the model was trained with")
        if len(prompt) > self.model.config.block_size:
            raise ModelError(f"the prompt has {len(prompt)} tokens but the model's context (block_size) is "
                             f"{self.model.config.block_size}; shorten it")
        return prompt

    def cancel(self, handle: RequestHandle) -> None:
        """End the request with finish_reason "cancelled" and free its blocks (module docstring: when)."""
        req = self._requests.get(handle.request_id)
        if req is None:
            return
        req.cancel_requested = True
        if self._lock.acquire(blocking=False):
            try:
                self._drain_inbox()
                self._sweep_cancelled()
            finally:
                self._lock.release()

    # ----- stepping -----
    def step(self) -> bool:
        """One iteration: admit, decode every running request by one token, prefill a budget of prompt
        tokens. False if there was nothing to run."""
        with self._lock, torch.inference_mode():
            self._stepping = threading.get_ident()
            try:
                return self._step()
            finally:
                self._stepping = None
                wakeups, self._wakeups = self._wakeups, []
                notify_waiters(wakeups)

    def _step(self) -> bool:
        self._drain_inbox()
        self._sweep_cancelled()
        self.scheduler.admit()
        plan = self.scheduler.plan()
        if not plan.decode and not plan.prefill:
            return False
        with _eval_mode(self.model):
            if plan.decode:
                self._decode(plan.decode)
            for group in prefill_groups(plan.prefill):
                self._run([r for r, _ in group], [n for _, n in group])
        self._sweep_cancelled()
        if not self.scheduler.running:
            self._slotted.clear()  # drop finished requests now rather than at the next decode
        self.counters["steps"] += 1
        return True

    def _notify(self, waiters: list) -> None:
        """Wake asyncio consumers: at the end of the step when called from inside one (one thread-safe call
        per event loop per step instead of one per token), else now."""
        if self._stepping == threading.get_ident():
            self._wakeups += waiters
        else:
            notify_waiters(waiters)

    def step_or_raise(self) -> None:
        if not self.step() and self._pending():
            raise RuntimeError("the engine has requests it cannot schedule")

    def _decode(self, reqs: list[Request]) -> None:
        """One token for each decoding request: from their slots when they fit, else from the pool."""
        if self._place_in_slots(reqs):
            self._run(list(self._slotted), [1] * len(reqs), slotted=True)
        else:
            self._slotted.clear()
            self._run(reqs, [1] * len(reqs))

    def _place_in_slots(self, reqs: list[Request]) -> bool:
        """Keep slots dense over the decoding requests: a leaver's slot takes the last one's contents,
        a newcomer takes the next slot and its keys/values are copied from its blocks."""
        width = max(len(r.prompt) + r.max_tokens for r in reqs)
        if self.slots is None or not self.slots.reserve(len(reqs), width):
            return False
        live = {r.id for r in reqs}
        slotted, i = self._slotted, 0
        while i < len(slotted):
            if slotted[i].id in live:
                i += 1
            elif i == len(slotted) - 1 or slotted[-1].id not in live:
                slotted.pop()
            else:
                self.slots.move(len(slotted) - 1, i)
                slotted[i] = slotted.pop()
        held = {r.id for r in slotted}
        for req in reqs:
            if req.id not in held:
                self.slots.load(len(slotted), req.table, req.computed)
                slotted.append(req)
        return True

    def _run(self, reqs: list[Request], ns: list[int], slotted: bool = False) -> None:
        """One forward over the next ns[b] tokens of each request; sample those whose prompt is then done.

        A forward that raises is retried request by request, so only the request that causes it fails.
        """
        try:
            hidden = self._forward(reqs, ns, slotted)
        except Exception as e:  # a failing request must not take the engine (or the server) down
            self._slotted.clear()  # the slots may hold partial writes: reload them from the pool
            if len(reqs) > 1:
                for req, n in zip(reqs, ns, strict=True):
                    self._run([req], [n])
            else:
                self._fail(reqs, e)
            return
        try:
            self.counters["prompt_tokens"] += sum(n for r, n in zip(reqs, ns, strict=True) if r.prefilling)
            for req, n in zip(reqs, ns, strict=True):
                if not req.padding:
                    req.computed += n
                    self.scheduler.register_full_blocks(req)
            # Decodes and prompts just done; a padding row's outputs are discarded.
            rows = [b for b, r in enumerate(reqs) if not r.prefilling and not r.padding]
            if rows:
                last = hidden[torch.tensor(rows), torch.tensor([ns[b] - 1 for b in rows])]
                self._sample([reqs[b] for b in rows], self.model.head(last))
        except Exception as e:
            self._fail([r for r in reqs if r in self.scheduler.running], e)

    def _forward(self, reqs: list[Request], ns: list[int], slotted: bool = False) -> torch.Tensor:
        """Hidden states [B, max(ns), d_model] for the requests' next tokens (shorter rows padded).

        A padding row (a finished request of a static batch) recomputes its last position, writing its
        keys/values to the null block: the row costs what a decode row costs and changes nothing."""
        for req, n in zip(reqs, ns, strict=True):
            if not req.padding:
                self.scheduler.grow(req, n)
        T = max(ns)
        tables, starts = [r.table for r in reqs], [r.computed - r.padding for r in reqs]
        discard = [r.padding for r in reqs]
        batch = (SlotBatch(self.slots, tables, starts, discard) if slotted
                 else PagedBatch(self.kv, tables, starts, T, ns, discard))
        rows = zip(reqs, starts, ns, strict=True)
        idx = torch.tensor([r.tokens[s:s + n] + [0] * (T - n) for r, s, n in rows], device=self.kv.device)
        return self.model(idx, cache=batch, return_hidden=True)

    def _fail(self, reqs: list[Request], error: Exception) -> None:
        log.error("engine forward failed for requests %s", [r.id for r in reqs], exc_info=error)
        for req in reqs:
            self._finish(req)
            if not req.padding:  # a padding row's request has already finished
                self.counters["requests_failed"] += 1
                req.handle._fail(error)

    # ----- sampling and outputs -----
    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        want = [b for b, r in enumerate(reqs) if r.params.logprobs is not None]
        logprobs = logits[want].float().log_softmax(dim=-1) if want else None
        for b, req in enumerate(reqs):
            p = req.params
            if p.temperature == 0:
                tok = greedy[b]
            else:
                tok = int(next_token(logits[b:b + 1], p.temperature, p.top_k, p.top_p, req.generator)[0])
            entry = _logprob_entry(logprobs[want.index(b)], tok, p.logprobs) if b in want else None
            self._emit(req, tok, entry)

    def _emit(self, req: Request, tok: int, entry: dict | None) -> None:
        req.tokens.append(tok)
        req.generated += 1
        self.counters["tokens_generated"] += 1
        stop_id = tok in req.params.stop_token_ids
        final = stop_id or req.generated >= req.max_tokens
        text, stopped = req.text.add(None if stop_id else tok, final)
        reason = "stop" if stop_id or stopped else "length" if final else None
        if reason is not None:
            self.scheduler.finish(req)
            self._requests.pop(req.id, None)
            self.counters["requests_finished"] += 1
        req.handle._put(StepOutput([tok], text, None if entry is None else [entry], reason))

    def _finish(self, req: Request) -> None:
        """A cancelled or failed request leaves the batch (and the engine) at once."""
        self.scheduler.retire(req)
        self._requests.pop(req.id, None)

    def _sweep_cancelled(self) -> None:
        queued = (*self.scheduler.waiting, *self.scheduler.running)
        for req in [r for r in queued if r.cancel_requested and not r.padding]:
            self._finish(req)
            req.handle._put(StepOutput([], "", None, "cancelled"))

    def _drain_inbox(self) -> None:
        with self._wake:
            self.scheduler.waiting.extend(self._inbox)
            self._inbox.clear()

    def _pending(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running)

    # ----- background thread -----
    @property
    def running(self) -> bool:
        """Whether the background thread is stepping."""
        return self._thread is not None

    def start(self) -> None:
        """Step on a background thread whenever requests exist."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llmlab-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; requests still waiting or running are cancelled."""
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify_all()
            self._thread.join()
            self._thread = None
        with self._wake:
            for req in (*self._inbox, *self.scheduler.waiting, *self.scheduler.running):
                req.cancel_requested = True
        with self._lock:
            self._drain_inbox()
            self._sweep_cancelled()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending():
                    self._wake.wait()
                if self._stopping:
                    return
            if not self.step():
                with self._wake:
                    self._wake.wait(timeout=0.01)

    # ----- scoring and introspection -----
    def prompt_logprobs(self, ids, top: int | None = None) -> list:
        """log p(ids[i] | ids[:i]) for each position (None for the first), from one forward of the model.

        With top=k, each entry is instead a dict like StepOutput.logprobs' ({"token_id", "logprob", "top"})
        with the k most likely tokens at that position (echo scoring that also checks greedy agreement).
        """
        prompt = self._check_prompt(ids)
        with self._lock, torch.inference_mode():
            with _eval_mode(self.model):
                logits = self.model(torch.tensor([prompt], device=self.kv.device))[0, :-1]
            logprobs = logits.float().log_softmax(dim=-1)
            if top is None:
                chosen = logprobs.gather(1, torch.tensor(prompt[1:], device=logits.device)[:, None])
                return [None] + chosen[:, 0].tolist()
            return [None] + [_logprob_entry(logprobs[i], t, top) for i, t in enumerate(prompt[1:])]

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def clear_prefix_cache(self) -> None:
        """Forget cached prefixes (call after changing the model's weights)."""
        with self._lock:
            self.pool.clear_cache()

    def stats(self) -> dict:
        pool = self.pool
        return dict(running=len(self.scheduler.running), waiting=self.num_waiting, blocks_used=pool.used,
                    blocks_total=pool.capacity, blocks_cached=len(pool.by_key), block_size=pool.block_size,
                    prefix_hits=self.scheduler.prefix_hit_blocks,
                    prefix_hit_tokens=self.scheduler.prefix_hit_blocks * pool.block_size, **self.counters)


def split_kv_budget(budget: int | None, per_block: int, max_running: int, context_blocks: int,
                    contiguous_decode: bool, cpu: bool) -> tuple[int, int]:
    """(pool blocks, decode-slot bytes) that together fit the keys/values budget.

    The slots get what max_running rows of the whole context need, at most half the budget; the pool gets
    the rest. budget None: room for max_running requests of the whole context in the pool and in the slots
    (admission never waits for memory and decodes always fit their slots), at most 1 GiB in all on CPU."""
    slots_max = max_running * context_blocks * per_block if contiguous_decode else 0
    if budget is None:
        budget = (max_running * context_blocks + 1) * per_block + slots_max
        if cpu:
            budget = max(min(budget, CPU_DEFAULT_BUDGET), 4 * per_block)  # 2 pool blocks + slots
    slots = min(slots_max, budget // 2)
    return (budget - slots) // per_block, slots


def _logprob_entry(logprobs: torch.Tensor, tok: int, top: int) -> dict:
    """{"token_id", "logprob", "top": {id: logprob} best first} from one position's log-probabilities [V]."""
    entry = {"token_id": tok, "logprob": float(logprobs[tok]), "top": {}}
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        entry["top"] = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return entry


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (dropout off) for the block, as it was after; a no-op when already in eval
    mode (setting every module's flag each step is not free)."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def prefill_groups(chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """Prompt chunks grouped into forwards: longest first, a group growing while padding stays under half
    of its positions (one forward per group instead of one per prompt)."""
    groups: list[list[tuple[Request, int]]] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * group[0][1] <= 2 * (sum(n for _, n in group) + chunk[1]):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
