"""A request's handle: a thread-safe stream of StepOutputs, iterable from plain code and from asyncio.

The engine thread puts outputs; the consumer iterates. `for out in handle` blocks (and, when no engine thread
is running, drives engine.step() itself, so scripts and tests need no thread); `async for out in handle`
awaits without blocking the event loop (outputs are handed over with loop.call_soon_threadsafe; the engine
batches a step's wake-ups into one call per event loop, notify_waiters). A consumer that serves many
requests from one task (the server) calls drain(waiter) instead: everything a request produced since the
last call, merged into one output, or a wake-up registered on the consumer's own event. A consumer that
falls behind the engine then gets several steps' tokens at once rather than a backlog of one-token outputs
(as vLLM's output collector merges them).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from llmlab.errors import LLMLabError
from llmlab.infer.engine.params import StepOutput


def notify_waiters(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Set each waiting consumer's event on its own loop: one thread-safe call per loop, not per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, event in waiters:
        by_loop.setdefault(loop, []).append(event)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the consumer's event loop is closed: nobody is waiting any more
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs joined, the last finish_reason."""
    if len(outputs) == 1:
        return outputs[0]
    logprobs = [e for out in outputs for e in out.logprobs or []]
    return StepOutput([t for out in outputs for t in out.token_ids], "".join(out.text for out in outputs),
                      logprobs if any(out.logprobs is not None for out in outputs) else None,
                      outputs[-1].finish_reason)


class EngineError(LLMLabError):
    """A request failed inside the engine (the exception that caused it is chained)."""


class RequestHandle:
    def __init__(self, engine, request_id: int, prompt_ids: list[int]):
        self._engine, self.request_id, self.prompt_ids = engine, request_id, prompt_ids
        self._cond = threading.Condition()
        self._outputs: deque[StepOutput] = deque()
        self._done = False
        self._error: BaseException | None = None
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.num_generated = 0
        self.finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop generating; the request's KV blocks are freed now, or at the end of the engine's current
        step."""
        self._engine.cancel(self)

    # ----- producer side (engine) -----
    def _put(self, out: StepOutput) -> None:
        with self._cond:
            self.num_generated += len(out.token_ids)
            if out.finish_reason is not None:
                self._done, self.finish_reason = True, out.finish_reason
            self._outputs.append(out)
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error, self._done = error, True
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        if self._waiter is not None:
            self._engine._notify([self._waiter])
            self._waiter = None

    # ----- consumer side -----
    def _next_ready(self) -> StepOutput | None:
        """The next output, None if there is none yet; StopIteration / EngineError at the end."""
        if self._outputs:
            return self._outputs.popleft()
        self._raise_failure()
        if self._done:
            raise StopIteration
        return None

    def _raise_failure(self) -> None:
        if self._error is not None:
            error = self._error
            raise EngineError(f"request {self.request_id} failed in the engine: {error}") from error

    def __iter__(self):
        return self

    def __next__(self) -> StepOutput:
        while True:
            with self._cond:
                out = self._next_ready()
                if out is not None:
                    return out
                if self._engine.running:
                    self._cond.wait(timeout=0.1)
                    continue
            self._engine.step_or_raise()

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        while True:
            with self._cond:
                try:
                    out = self._next_ready()
                except StopIteration:
                    raise StopAsyncIteration from None
                if out is not None:
                    return out
                if self._engine.running:
                    event = asyncio.Event()
                    self._waiter = (asyncio.get_running_loop(), event)
            if not self._engine.running:
                self._engine.step_or_raise()  # no engine thread: step inline (blocks the loop meanwhile)
                continue
            await event.wait()

    def drain(self, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> StepOutput | None:
        """Every output not yet taken, merged into one (merge_outputs); None if there is none, after
        registering `waiter` (loop, event): the event is set on its loop at the next output. The last output
        has a finish_reason; a failed request raises EngineError once the outputs before the failure are
        taken. One consumer per handle."""
        with self._cond:
            if self._outputs:
                outputs = list(self._outputs)
                self._outputs.clear()
                return merge_outputs(outputs)
            self._raise_failure()
            if not self._done:
                self._waiter = waiter
            return None

    def result(self) -> StepOutput:
        """Run to the end; all outputs joined into one (token_ids, text, logprobs, finish_reason)."""
        tokens, text, logprobs, reason = [], [], [], None
        for out in self:
            tokens += out.token_ids
            text.append(out.text)
            logprobs += out.logprobs or []
            reason = out.finish_reason
        return StepOutput(tokens, "".join(text), logprobs or None, reason)
