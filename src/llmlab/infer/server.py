"""An OpenAI-compatible HTTP server over the continuous-batching engine, with a chat page at /.

    llmlab serve runs/demo/ckpt-000500              # http://127.0.0.1:8000, OpenAI API under /v1

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="ckpt-000500", messages=[{"role": "user", "content": "hi"}])

    app = create_app(engine, tok, model_name="demo")   # a FastAPI app; its lifespan starts/stops the engine
    with BackgroundServer(app) as url: ...             # uvicorn in a thread on a free loopback port

Endpoints: /v1/models, /v1/completions and /v1/chat/completions (JSON, or server-sent events with
stream=true: `data: {...}` chunks, then `data: [DONE]`), /health, /metrics (Prometheus text) and the chat
page (llmlab/infer/web). A request is checked here, then becomes n engine requests (seeds seed, seed+1, ...
when n > 1). Echo and logprobs on /v1/completions follow OpenAI's legacy format, so harnesses that score
log-likelihoods through it (lm-evaluation-harness's local-completions: echo, logprobs=1, max_tokens 0 or 1)
read the prompt tokens' log-probabilities; the first prompt token has none (null).

Safe by default: loopback unless told otherwise; an optional Bearer API key on /v1 and /metrics; limits on
body size, prompt tokens, max_tokens, n and the engine's waiting queue (429 with Retry-After). Every refusal
is OpenAI's error shape {"error": {"message", "type", "param", "code"}} with its 4xx status, and anything
unexpected is a 500 for that request only. A client that goes away cancels its engine requests, which
returns their KV blocks at once.

Chat replies leave out special-token text (class SpecialText); completions are the raw decoded text.
Chat prompts use the tokenizer's chat template (tok.apply_chat_template) when it has one; otherwise a plain
"role: content" transcript after the end-of-document token, ending in "assistant:", with "\\nuser:" as a
stop string so the model does not write the user's next turn.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.errors import ConfigError, LLMLabError, TokenizerError
from llmlab.infer.engine import Engine, EngineFull, SamplingParams

WEB_DIR = Path(__file__).parent / "web"
PLAIN_STOPS = ("\nuser:",)  # the plain chat template's turn marker (see the module docstring)
MAX_STOPS = 16  # OpenAI allows 4; evaluation harnesses' tasks may pass more (vLLM sets no limit)
# The interpreter's thread switch interval while serving (Python's default: 5 ms). The engine thread lets go
# of the GIL in every torch call; while the event loop's thread runs Python (streaming tokens), getting it
# back can take up to this long, which stalls the step that every running request waits for.
SWITCH_INTERVAL_S = 0.0005


# ----- limits and errors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx before it reaches the engine."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context (block_size)
    max_tokens: int = 1024               # per choice
    max_n: int = 8
    max_waiting: int = 256               # engine requests waiting for a slot; beyond: 429
    retry_after_s: int = 1

    def check(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_n", "max_waiting", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server limit {name}={getattr(self, name)} must be >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"server limit max_prompt_tokens={self.max_prompt_tokens} must be >= 1 "
                              "(or None for the model's context)")


class APIError(Exception):
    """A refused request: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----- request bodies ---------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields both endpoints share (strict types: "5" is not a number); unknown fields are ignored."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's); -1 or 0: every token
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # an extension (vLLM's): keep going past the end-of-text token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The content as text (a list of parts: their "text" parts joined)."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise APIError(400, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                           "messages")
        return "".join(part["text"] for part in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse_body(raw: bytes, kind: type[_Body]) -> _Body:
    """JSON bytes -> a checked request body, or a 400 naming the first bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _type_tag(p)) or None
        raise APIError(400, f"{param}: {err['msg']} (got {_short(err.get('input'))})", param) from None
    unsupported = {"presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                   "logit_bias": body.logit_bias or None}
    for name, value in unsupported.items():
        if value:
            raise APIError(400, f"{name}={value!r} is not supported by this server; leave it out", name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return body


def _type_tag(loc_part) -> bool:
    """Whether a pydantic error location part names a union member (e.g. "str", "list[int]"), not a field."""
    return isinstance(loc_part, str) and ("[" in loc_part or loc_part in {"str", "int", "float", "bool"})


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----- prompts ----------------------------------------------------------------------------------------------
def chat_prompt(tok, messages: list[dict[str, str]]) -> tuple[list[int], tuple[int, ...], tuple[str, ...]]:
    """(prompt ids ending where the assistant's reply starts, stop token ids, stop strings) for a chat.

    The tokenizer's chat template when it has one, else the plain template (module docstring). The same
    function renders `llmlab chat`'s prompts, so the page, the API and the terminal agree."""
    try:
        template = tok.chat_template
    except TokenizerError:  # no stored template and no chat tokens: the plain template
        template = None
    if template is not None:
        ids, _ = tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids), tuple(template.stop_ids), ()
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    start = [tok.eos_id] if tok.eos_id is not None else []
    stops = (tok.eos_id,) if tok.eos_id is not None else ()
    return start + tok.encode_ordinary(text), stops, PLAIN_STOPS


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


# ----- metrics ----------------------------------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]


class Metrics:
    """Request, token and latency counters for /metrics (engine gauges are read at scrape time)."""

    WINDOW_S = 10.0  # tokens/s is measured over the last ten seconds

    def __init__(self):
        latency = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.ttft = Histogram("llmlab_time_to_first_token_seconds",
                              "time from a request's arrival to its first generated token", latency)
        self.tpot = Histogram("llmlab_time_per_output_token_seconds",
                              "time between generated tokens of one request", latency)
        self.requests: dict[str, int] = {}
        self.prompt_tokens = self.generation_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def tokens(self, n: int, now: float) -> None:
        with self.lock:
            self.generation_tokens += n
            self.recent.append((now, n))

    def tokens_per_s(self, now: float) -> float:
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / self.WINDOW_S

    def render(self, stats: dict) -> str:
        now = time.monotonic()
        gauges = [("llmlab_requests_running", "engine requests decoding now", stats.get("running", 0)),
                  ("llmlab_requests_waiting", "engine requests waiting for a slot", stats.get("waiting", 0)),
                  ("llmlab_kv_blocks_used", "KV-cache blocks in use", stats.get("blocks_used", 0)),
                  ("llmlab_kv_blocks_total", "KV-cache blocks in the pool", stats.get("blocks_total", 0)),
                  ("llmlab_generation_tokens_per_second", "generated tokens per second, last 10 s",
                   round(self.tokens_per_s(now), 3))]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        counters = [("llmlab_prompt_tokens_total", "prompt tokens received", self.prompt_tokens),
                    ("llmlab_generation_tokens_total", "tokens generated", self.generation_tokens),
                    ("llmlab_prefix_cache_hits_total", "prompt blocks served from the prefix cache",
                     stats.get("prefix_hits", 0))]
        for name, help, value in counters:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP llmlab_requests_total engine requests finished, by finish reason",
                  "# TYPE llmlab_requests_total counter"]
        lines += [f'llmlab_requests_total{{finish_reason="{r}"}} {n}'
                  for r, n in sorted(self.requests.items())]
        return "\n".join(lines + self.ttft.lines() + self.tpot.lines()) + "\n"


# ----- running engine requests ------------------------------------------------------------------------------
@dataclass
class Job:
    """One engine request (one choice) and what has come back so far."""
    index: int
    prompt: list[int]
    handle: Any = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish_reason: str | None = None


class Service:
    """What the endpoints share: the engine, tokenizer, model name, limits and metrics."""

    def __init__(self, engine: Engine, tok, model_name: str, limits: Limits, api_key: str | None):
        limits.check()
        self.engine, self.tok, self.model_name, self.limits = engine, tok, model_name, limits
        self.api_key = api_key
        self.metrics = Metrics()
        self.context = engine.model.config.block_size
        self.created = int(time.time())

    # -- checks --
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not valid:
            what = "no API key given" if not given else "the API key is not valid"
            raise APIError(401, f"{what}; send the header 'Authorization: Bearer KEY' with the server's key",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                "(see /v1/models)", "model", "model_not_found")

    def budget(self, prompt: list[int], asked: int | None, default: int | None) -> int:
        """The max_tokens one choice gets, after the prompt-length and max_tokens limits."""
        longest = self.limits.max_prompt_tokens or self.context
        if len(prompt) > min(longest, self.context):
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                                f"{min(longest, self.context)}; shorten it", "prompt",
                           "context_length_exceeded")
        room = self.context - len(prompt)
        if asked is None:
            return min(default if default is not None else room, room, self.limits.max_tokens)
        if asked > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {self.limits.max_tokens}",
                           "max_tokens")
        if asked > room:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens={asked} exceeds the "
                                f"model's context of {self.context} tokens; lower max_tokens or shorten the "
                                "prompt",
                           "max_tokens", "context_length_exceeded")
        return asked

    def check_queue(self, extra: int) -> None:
        if self.engine.stats().get("waiting", 0) + extra > self.limits.max_waiting:
            raise self.busy()

    def busy(self) -> APIError:
        return APIError(429, "the server is busy (its request queue is full); retry after a moment",
                        code="queue_full", headers={"Retry-After": str(self.limits.retry_after_s)})

    # -- engine --
    def params(self, body: _Body, max_tokens: int, seed_offset: int, stop_ids: tuple[int, ...],
               stops: tuple[str, ...], logprobs: int | None) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOPS or any(not s for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
        top_k = body.top_k if body.top_k and body.top_k > 0 else None
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=top_k, seed=None if body.seed is None else body.seed + seed_offset,
                              stop=stop + stops, stop_token_ids=() if body.ignore_eos else stop_ids,
                              logprobs=logprobs)

    def submit(self, jobs: list[Job], params: list[SamplingParams]) -> None:
        """Start every job, or none: a refusal cancels the ones already started."""
        self.check_queue(len(jobs))
        try:
            for job, p in zip(jobs, params, strict=True):
                job.handle = self.engine.submit(job.prompt, p)
        except EngineFull:
            cancel(jobs)
            raise self.busy() from None
        except LLMLabError as e:
            cancel(jobs)
            raise APIError(400, " ".join(str(e).split())) from None
        self.metrics.prompt_tokens += sum(len(j.prompt) for j in jobs)

    async def outputs(self, jobs: list[Job]):
        """(job, StepOutput) as the jobs produce them, until every job has finished; metrics on the way.

        One task serves all of a request's jobs: after each wake-up it takes every job's new tokens at once
        (RequestHandle.drain), so a step's tokens cost one pass here, and a stream that falls behind the
        engine sends the tokens it missed in one chunk instead of queueing one chunk per token."""
        loop, engine = asyncio.get_running_loop(), self.engine
        start = time.monotonic()
        last = {j.index: None for j in jobs}
        live = list(jobs)
        try:
            while live:
                event = asyncio.Event()
                ready = [(job, out) for job in live if (out := job.handle.drain((loop, event))) is not None]
                # Every request ends with an output that has a finish_reason (or drain raises its failure).
                ended = {job.index for job, out in ready if out.finish_reason is not None}
                live = [job for job in live if job.index not in ended]
                if not ready:
                    if engine.running:
                        await event.wait()
                    else:  # no engine thread (tests driving the app directly): step inline
                        engine.step_or_raise()
                    continue
                now = time.monotonic()
                for job, out in ready:
                    if out.token_ids:
                        self._observe(last, job.index, len(out.token_ids), start, now)
                    if out.finish_reason is not None:
                        self.metrics.finished(out.finish_reason)
                    yield job, out
        finally:
            cancel(jobs)

    def _observe(self, last: dict, index: int, n: int, start: float, now: float) -> None:
        previous = last[index]
        if previous is None:
            self.metrics.ttft.observe(now - start)
            if n > 1:
                self.metrics.tpot.observe(0.0, n - 1)
        else:
            self.metrics.tpot.observe((now - previous) / n, n)
        last[index] = now
        self.metrics.tokens(n, now)


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        if job.handle is not None and job.finish_reason is None:
            job.handle.cancel()


def _record(job: Job, out) -> None:
    job.text += out.text
    job.token_ids += list(out.token_ids)
    if out.logprobs:
        job.logprobs = job.logprobs or []
        job.logprobs.extend(out.logprobs)
    if out.finish_reason is not None:
        job.finish_reason = out.finish_reason


async def collect(service: Service, jobs: list[Job], request: Request) -> None:
    """Run jobs to the end; a client that disconnects meanwhile cancels them."""
    async def run() -> None:
        async for job, out in service.outputs(jobs):
            _record(job, out)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)

    runner, watcher = asyncio.create_task(run()), asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({runner, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            runner.result()
    finally:
        watcher.cancel()
        runner.cancel()
        cancel(jobs)


_json = json.JSONEncoder(separators=(",", ":")).encode  # compact, and no encoder built per call


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else _json(data)}\n\n"


class SpecialText:
    """Drops special-token text (<|assistant|>, <|eos|>, ...) from a streamed chat reply, as vLLM's
    skip_special_tokens does: a client sends the reply back in the next turn, and a chat template refuses
    messages that write control tokens. A piece ending in what may begin one is held until the next piece."""

    def __init__(self, tok):
        self.specials = sorted(tok.special_tokens, key=len, reverse=True)
        self.held = ""

    def feed(self, text: str, final: bool = False) -> str:
        text, self.held = self.held + text, ""
        for special in self.specials:
            text = text.replace(special, "")
        if not final:
            for k in range(min(len(text), max(map(len, self.specials), default=1) - 1), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.specials):
                    text, self.held = text[:-k], text[-k:]
                    break
        return text


# ----- logprobs in OpenAI's shapes --------------------------------------------------------------------------
def top_pairs(entry: dict) -> list[tuple[int, float]]:
    """An engine logprob entry's alternatives as (id, logprob), the chosen token included."""
    pairs = dict(entry.get("top") or {})
    pairs[entry["token_id"]] = entry["logprob"]
    return sorted(pairs.items(), key=lambda p: -p[1])


class LegacyLogprobs:
    """/v1/completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tok, offset: int):
        self.tok, self.offset = tok, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        text = token_text(self.tok, token_id)
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {token_text(self.tok, i): v for i, v in top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_generated(self, entries: list[dict]) -> None:
        for e in entries:
            self.add(e["token_id"], e["logprob"], top_pairs(e))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def chat_logprobs(tok, entries: list[dict], top: int) -> dict:
    """/v1/chat/completions' logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tok, token_id), "logprob": logprob,
                "bytes": list(tok.decode_bytes([token_id]))}

    content = []
    for e in entries:
        alternatives = [item(i, v) for i, v in top_pairs({**e, "top": e.get("top")})][:top] if top else []
        content.append({**item(e["token_id"], e["logprob"]), "top_logprobs": alternatives})
    return {"content": content}


# ----- the endpoints ----------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def completions(service: Service, request: Request, body: CompletionBody):
    tok = service.tok
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported (other than best_of = n); leave it out", "best_of")
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server; leave it out", "suffix")
    if body.n > service.limits.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit of {service.limits.max_n}", "n")
    prompts = _prompt_ids(service, body.prompt)
    budgets = [service.budget(p, body.max_tokens, 16) for p in prompts]
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not available when streaming; set stream=false", "echo")
    stop_ids = (tok.eos_id,) if tok.eos_id is not None else ()
    jobs, params = [], []
    for p_index, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        for j in range(body.n):
            jobs.append(Job(p_index * body.n + j, prompt))
            params.append(service.params(body, budget, j, stop_ids, (), body.logprobs))
    prompt_tokens = sum(len(p) for p in prompts)
    scores = await _score(service, prompts, body) if body.echo and body.logprobs is not None else None
    service.submit(jobs, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}
    if body.stream:
        def chunk(job: Job, out) -> dict:
            echoed = tok.decode(job.prompt) if body.echo and not job.token_ids else ""
            return {"index": job.index, "text": echoed + out.text,
                    "logprobs": _stream_logprobs(tok, out, body.logprobs), "finish_reason": out.finish_reason}

        return _stream(service, jobs, body, head, prompt_tokens, chunk)
    await collect(service, jobs, request)
    choices = []
    for job in jobs:
        prompt_text = tok.decode(job.prompt) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            lp = LegacyLogprobs(tok, 0 if body.echo else len(tok.decode(job.prompt)))
            if scores is not None:  # the prompt's tokens: the first has no log-probability
                lp.add(job.prompt[0], None, None)
                lp.add_generated(scores[job.index // body.n][1:])
            lp.add_generated(job.logprobs or [])
            logprobs = lp.as_dict()
        choices.append({"index": job.index, "text": prompt_text + job.text, "logprobs": logprobs,
                        "finish_reason": job.finish_reason})
    completion_tokens = sum(len(j.token_ids) for j in jobs)
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _prompt_ids(service: Service, prompt) -> list[list[int]]:
    """The prompt(s) as token ids: text is encoded (special-token text included), ids are checked."""
    tok = service.tok
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list; give a string, strings, or token ids", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tok.encode(p, allowed_special="all")
            ids = ids or ([tok.eos_id] if tok.eos_id is not None else [])
        else:
            ids = list(p)
            bad = [i for i in ids if not 0 <= i < service.engine.model.config.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 to "
                                    f"{service.engine.model.config.vocab_size - 1})", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token", "prompt")
        out.append(ids)
    return out


async def _score(service: Service, prompts: list[list[int]], body: CompletionBody) -> list[list]:
    """Each prompt's per-token log-probability entries (engine.prompt_logprobs), off the event loop."""
    score = service.engine.prompt_logprobs
    return [await anyio.to_thread.run_sync(lambda p=p: score(p, top=body.logprobs)) for p in prompts]


def _stream_logprobs(tok, out, k: int | None) -> dict | None:
    if k is None:
        return None
    lp = LegacyLogprobs(tok, 0)
    lp.add_generated(out.logprobs or [])
    return lp.as_dict()


async def chat_completions(service: Service, request: Request, body: ChatBody):
    if body.n > service.limits.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit of {service.limits.max_n}", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        prompt, stop_ids, stops = chat_prompt(service.tok, messages)
    except LLMLabError as e:
        raise APIError(400, " ".join(str(e).split()), "messages") from None
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    budget = service.budget(prompt, asked, None)
    top = body.top_logprobs or 0
    jobs = [Job(j, prompt) for j in range(body.n)]
    params = [service.params(body, budget, j, stop_ids, stops, top if body.logprobs else None)
              for j in range(body.n)]
    service.submit(jobs, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.model_name}
        filters = [SpecialText(service.tok) for _ in jobs]

        def chunk(job: Job, out) -> dict:
            text = filters[job.index].feed(out.text, final=out.finish_reason is not None)
            delta = {"content": text} if job.token_ids else {"role": "assistant", "content": text}
            logprobs = chat_logprobs(service.tok, out.logprobs or [], top) if body.logprobs else None
            return {"index": job.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": out.finish_reason}

        return _stream(service, jobs, body, head, len(prompt), chunk)
    await collect(service, jobs, request)
    choices = [{"index": j.index, "message": {"role": "assistant",
                                              "content": SpecialText(service.tok).feed(j.text, final=True)},
                "logprobs": chat_logprobs(service.tok, j.logprobs or [], top) if body.logprobs else None,
                "finish_reason": j.finish_reason} for j in jobs]
    return {"id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": choices, "usage": _usage(len(prompt), sum(len(j.token_ids) for j in jobs))}


def _stream(service: Service, jobs: list[Job], body: _Body, head: dict, prompt_tokens: int,
            choice) -> StreamingResponse:
    """Server-sent events: one chunk per engine output (choice(job, out) builds its choice), an optional
    usage chunk, then [DONE]. The client going away cancels the generator, and with it the jobs.
    A chunk's constant part (id, model, ...) is serialised once; only the choice is encoded per chunk."""
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    before = f"data: {_json(head)[:-1]},\"choices\":["
    after = "]" + (',"usage":null' if include_usage else "") + "}\n\n"

    async def events():
        try:
            async for job, out in service.outputs(jobs):
                text = before + _json(choice(job, out)) + after
                _record(job, out)
                yield text
        except Exception as e:  # headers are sent: the error can only go into the stream, then it ends
            yield sse(APIError(500, f"the request failed ({' '.join(str(e).split())})").body())
            return
        if include_usage:
            completion = sum(len(j.token_ids) for j in jobs)
            yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----- the app ----------------------------------------------------------------------------------------------
def create_app(engine: Engine, tok, model_name: str = "llmlab", limits: Limits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The server as a FastAPI app. Its lifespan starts the engine's background thread and stops it."""
    service = Service(engine, tok, model_name, limits or Limits(), api_key or None)

    @asynccontextmanager
    async def lifespan(app):
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            sys.setswitchinterval(switch_interval)

    app = FastAPI(title="llmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return APIError(500, f"internal error ({type(exc).__name__}); the request was dropped").response()

    async def read(request: Request, kind: type[_Body]) -> _Body:
        service.authorize(request)
        limit = service.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"the request body is over this server's limit of {limit} bytes")
        body = parse_body(bytes(raw), kind)
        service.check_model(body.model)
        return body

    @app.post("/v1/completions")
    async def post_completions(request: Request):
        return await completions(service, request, await read(request, CompletionBody))

    @app.post("/v1/chat/completions")
    async def post_chat(request: Request):
        return await chat_completions(service, request, await read(request, ChatBody))

    @app.get("/v1/models")
    async def models(request: Request):
        service.authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "llmlab", "max_model_len": service.context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        service.authorize(request)
        return PlainTextResponse(service.metrics.render(engine.stats()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/web/{name}")
    async def static(name: str):
        path = WEB_DIR / name
        if name not in {p.name for p in WEB_DIR.iterdir()} or name.startswith("."):
            raise APIError(404, f"no file {name!r} here")
        return FileResponse(path)

    return app


# ----- running it -------------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: a free one), or a ConfigError naming the problem."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or "
                          "--host") from None
    return sock


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on a loopback port (tests, benchmarks, notebooks).

        with BackgroundServer(app) as url:     # url = "http://127.0.0.1:PORT"
            ...
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started serving")
            time.sleep(0.01)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def load_engine(checkpoint: str | Path, *, tokenizer: str | Path | None = None, device: str = "auto",
                dtype: str = "auto", kv_budget_mb: float | None = None, max_running: int = 64,
                block_size: int = 16, prefill_chunk: int = 256):
    """(engine, tokenizer) for CHECKPOINT, quantized or not; the tokenizer is checked against the model."""
    from llmlab.device import resolve_device
    from llmlab.infer.generate import _load_tokenizer
    from llmlab.infer.quant import load_model

    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, device=resolve_device(device), dtype=dtype)
    tok = _load_tokenizer(checkpoint, tokenizer, model.config.vocab_size)
    budget = None if kv_budget_mb is None else int(kv_budget_mb * 2**20)
    engine = Engine(model, tok, kv_budget_bytes=budget, block_size=block_size, max_running=max_running,
                    prefill_chunk=prefill_chunk)
    return engine, tok


def serve(engine: Engine, tok, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, limits: Limits | None = None, log_level: str = "info",
          announce=print) -> None:
    """Serve until interrupted (Ctrl-C); binding errors are ConfigErrors raised before anything runs."""
    app = create_app(engine, tok, model_name, limits, api_key)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"llmlab: serving {model_name!r} at http://{shown}:{sock.getsockname()[1]} (chat page at /, "
             f"OpenAI API under /v1{', API key required' if api_key else ''})")
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


# ----- the terminal chat's text stream ----------------------------------------------------------------------
def chat_reply(engine: Engine, tok, messages: list[dict[str, str]], params: dict):
    """(handle, iterator over the reply's text pieces) for `llmlab chat`: the prompt rendered and the reply
    filtered as /v1/chat/completions does."""
    prompt, stop_ids, stops = chat_prompt(tok, messages)
    room = engine.model.config.block_size - len(prompt)
    if room < 1:
        raise ConfigError(f"the conversation ({len(prompt)} tokens) fills the model's context of "
                          f"{engine.model.config.block_size} tokens; start over with /reset")
    params = dict(params)
    max_tokens = min(params.pop("max_tokens", None) or room, room)
    handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, stop=stops, stop_token_ids=stop_ids,
                                                  **params))
    special = SpecialText(tok)
    return handle, (special.feed(out.text, final=out.finish_reason is not None) for out in handle)


__all__ = ["APIError", "BackgroundServer", "Limits", "chat_prompt", "chat_reply", "create_app", "listen",
           "load_engine", "serve"]
