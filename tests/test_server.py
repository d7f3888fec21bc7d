"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server on a
free loopback port (one per module; a tiny random model): outputs equal the model's own greedy decoding and
log-probabilities, concurrency and prefix caching change nothing, bad requests get OpenAI's error shape with
the right 4xx while the server keeps serving, and a client that goes away frees its KV blocks."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from llmlab.cli import main
from llmlab.infer import generate
from llmlab.infer.engine import Engine
from llmlab.infer.quant import quantize
from llmlab.infer.server import (
    BackgroundServer,
    Limits,
    SpecialText,
    chat_prompt,
    chat_reply,
    create_app,
    load_engine,
)
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer

KEY = "test-key"
WORDS = "the cat sat on a mat and the dog ran far away home while birds sang songs of the sea".split()


def tokenizer(special_tokens=None) -> Tokenizer:
    """A small BPE tokenizer; its default special tokens include llmlab's chat tokens (so a chat template)."""
    texts = [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(60)) + ".\n" for i in range(12)]
    return Tokenizer.train(texts, vocab_size=300, special_tokens=special_tokens, progress=False, workers=1)


def tiny_model(tok, block_size: int = 128) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, block_size=block_size)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def srv():
    """The main server: a tokenizer with llmlab's chat template, an API key, tight limits."""
    tok = tokenizer()
    model = tiny_model(tok)
    engine = Engine(model, tok, block_size=8, max_running=64, prefill_chunk=32)
    limits = Limits(max_body_bytes=32 * 1024, max_prompt_tokens=100, max_tokens=64, max_n=4)
    app = create_app(engine, tok, model_name="tiny", limits=limits, api_key=KEY)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, model=model, tok=tok, client=client)


def greedy(srv, ids: list[int], n: int) -> tuple[str, list[int], str]:
    """(text, new token ids, finish_reason) of llmlab's own greedy decoding, stopping at eos as served."""
    out = generate(srv.model, ids, n, temperature=0, stop=srv.tok.eos_id)[len(ids):].tolist()
    text = srv.tok.decode([t for t in out if t != srv.tok.eos_id])
    return text, out, "stop" if srv.tok.eos_id in out else "length"


def direct_logprobs(model, ids: list[int]) -> list[float | None]:
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def wait_idle(engine, timeout: float = 20.0) -> dict:
    """engine.stats() once nothing runs, waits or holds a block (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["blocks_used"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def prompts(tok, count: int) -> list[list[int]]:
    return [tok.encode(" ".join(WORDS[(i * 3) % len(WORDS):][:1 + i % 9])) for i in range(count)]


# ----- the happy paths ------------------------------------------------------------------------------------
def test_models_health_and_metrics(srv):
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    srv.client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0)
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("llmlab_requests_running", "llmlab_requests_waiting", "llmlab_kv_blocks_used",
                 "llmlab_generation_tokens_per_second", "llmlab_time_to_first_token_seconds_bucket",
                 "llmlab_time_per_output_token_seconds_count"):
        assert name in text
    count = [line for line in text.splitlines()
             if line.startswith("llmlab_time_to_first_token_seconds_count")]
    assert int(count[0].split()[1]) >= 1


def test_completion_equals_greedy_generate_with_usage(srv):
    ids = srv.tok.encode("the cat sat")
    text, new, reason = greedy(srv, ids, 20)
    r = srv.client.completions.create(model="tiny", prompt="the cat sat", max_tokens=20, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))
    assert r.usage.total_tokens == len(ids) + len(new)
    # token-id prompts (what lm-evaluation-harness sends) give the same
    r2 = srv.client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    assert r2.choices[0].text == text


def test_streamed_completion_equals_the_whole(srv):
    whole = srv.client.completions.create(model="tiny", prompt="a dog", max_tokens=24, temperature=0)
    chunks = list(srv.client.completions.create(model="tiny", prompt="a dog", max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_and_not_use_the_template(srv):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    ids, stop_ids, _ = chat_prompt(srv.tok, messages)
    assert ids == srv.tok.apply_chat_template(messages, add_generation_prompt=True)[0]
    assert stop_ids == srv.tok.chat_template.stop_ids
    r = srv.client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and 1 <= r.usage.completion_tokens <= 16
    stream = srv.client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_without_a_template_uses_the_plain_one(slow):
    tok = tokenizer(["<|eos|>"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi <|eos|>"}]
    ids, stop_ids, stops = chat_prompt(tok, messages)
    assert ids == [tok.eos_id] + tok.encode_ordinary("system: be brief\nuser: hi <|eos|>\nassistant:")
    assert (stop_ids, stops) == ((tok.eos_id,), ("\nuser:",))
    r = slow.http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 5,
                                                     "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
    assert "\nuser:" not in r.json()["choices"][0]["message"]["content"]


def test_chat_replies_leave_out_special_token_text(srv):
    f = SpecialText(srv.tok)
    assert [f.feed("ab<|ass"), f.feed("istant|>c<"), f.feed("d<|e", final=True)] == ["ab", "c", "<d<|e"]
    r = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat?"}],
                                           max_tokens=40, temperature=0)
    assert not any(s in r.choices[0].message.content for s in srv.tok.special_tokens)


def test_stop_strings_cut_the_text(srv):
    full = srv.client.completions.create(model="tiny", prompt="the sea", max_tokens=30, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:8]
    r = srv.client.completions.create(model="tiny", prompt="the sea", max_tokens=30, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_n_choices_are_the_single_requests_with_seed_plus_index(srv):
    r = srv.client.completions.create(model="tiny", prompt="birds", max_tokens=12, temperature=1.0, n=3,
                                      seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        alone = srv.client.completions.create(model="tiny", prompt="birds", max_tokens=12, temperature=1.0,
                                              seed=7 + c.index)
        assert c.text == alone.choices[0].text
    assert 3 <= r.usage.completion_tokens <= 36
    chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_echo_logprobs_are_the_models_own(srv):
    """lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens 0/1."""
    batch = [srv.tok.encode("the cat sat on a mat"), srv.tok.encode("a dog ran far")]
    for max_tokens in (0, 1):
        r = srv.client.completions.create(model="tiny", prompt=batch, max_tokens=max_tokens, temperature=0,
                                          echo=True, logprobs=1)
        for ids, choice in zip(batch, sorted(r.choices, key=lambda c: c.index), strict=True):
            lp = choice.logprobs
            expected = direct_logprobs(srv.model, ids)
            got = lp.token_logprobs[:len(ids)]
            assert got[0] is None and lp.top_logprobs[0] is None
            assert got[1:] == pytest.approx(expected[1:], abs=1e-4)
            assert "".join(lp.tokens[:len(ids)]) == srv.tok.decode(ids)
            assert len(lp.tokens) == len(ids) + max_tokens
            for value, top in zip(got[1:], lp.top_logprobs[1:len(ids)], strict=True):
                assert max(top.values()) >= value - 1e-6  # the best alternative is there (is_greedy)
            assert choice.text.startswith(srv.tok.decode(ids))


def test_generated_logprobs_are_the_models_own(srv):
    ids = srv.tok.encode("home while")
    r = srv.client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    _, new, _ = greedy(srv, ids, 6)
    expected = direct_logprobs(srv.model, ids + new)[len(ids):]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 4 and max(top.values()) == pytest.approx(v, abs=1e-5)  # greedy: chosen is best
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset[0] == len(srv.tok.decode(ids))
    chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)


def test_32_concurrent_clients_get_their_one_at_a_time_outputs(srv):
    rows = prompts(srv.tok, 32)

    def ask(i: int) -> str:
        return srv.client.completions.create(model="tiny", prompt=rows[i], max_tokens=4 + (i * 7) % 29,
                                             temperature=0).choices[0].text

    alone = [ask(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == alone
    assert alone[5] == greedy(srv, rows[5], 4 + 35 % 29)[0]
    assert wait_idle(srv.engine)["blocks_used"] == 0


def test_prefix_caching_changes_no_output(srv):
    shared = srv.tok.encode(" ".join(WORDS * 2))[:60]
    rows = [shared + srv.tok.encode(f" {w}") for w in WORDS[:6]]
    expected = [greedy(srv, r, 10)[0] for r in rows]
    hits = srv.engine.stats()["prefix_hits"]
    for _ in range(2):  # the first round fills the cache, the second reads it
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda r: srv.client.completions.create(
                model="tiny", prompt=r, max_tokens=10, temperature=0).choices[0].text, rows))
        assert got == expected
    assert srv.engine.stats()["prefix_hits"] > hits


# ----- bad requests ---------------------------------------------------------------------------------------
def post(srv, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{srv.url}{path}", content=content, headers=headers, timeout=30, **kw)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "tiny", "messages": [', 400, None),
    (b"\xff\xfe not utf-8", 400, None),
    ([1, 2], 400, None),
    ({**CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "temperature": 5}, 400, "temperature"),
    ({**CHAT, "n": True}, 400, "n"),
    ({**CHAT, "n": 99}, 400, "n"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "<|end|>"}]}, 400, "messages"),
    ({**CHAT, "stop": 7}, 400, "stop"),
    ({**CHAT, "stop": ["a"] * 17}, 400, "stop"),
    ({**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"messages": CHAT["messages"]}, 400, "model"),
    ({**CHAT, "model": "gpt-4"}, 404, "model"),
    ({**CHAT, "max_tokens": 65}, 400, "max_tokens"),
    ({**CHAT, "messages": [{"role": "user", "content": "the cat " * 80}]}, 400, "prompt"),
    ({**CHAT, "logprobs": 3}, 400, "logprobs"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 40000}]}, 413, None),
])
def test_bad_chat_requests_get_openai_errors(srv, body, status, param):
    r = post(srv, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert srv.client.chat.completions.create(**CHAT).choices[0].finish_reason  # still serving


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "prompt": [99999], "max_tokens": 1}, "prompt"),
    ({"model": "tiny", "prompt": [], "max_tokens": 1}, "prompt"),
    ({"model": "tiny", "prompt": "the cat", "max_tokens": 1, "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": [1] * 90, "max_tokens": 60}, "max_tokens"),
    ({"model": "tiny", "prompt": {"text": "x"}}, "prompt"),
])
def test_bad_completion_requests_get_400(srv, body, param):
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_api_key_is_required_and_checked(srv):
    for key in (None, "wrong"):
        r = post(srv, "/v1/chat/completions", CHAT, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{srv.url}/v1/models").status_code == 401
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert httpx.get(f"{srv.url}/nowhere").json()["error"]["message"]


@pytest.fixture(scope="module")
def slow():
    """A second server with one decoding slot and one waiting place, whose long requests outlast a client."""
    tok = tokenizer(["<|eos|>"])  # no chat tokens: chats use the plain template
    # Wide enough that 1,000 tokens take seconds even on a fast idle CPU: these tests disconnect or queue
    # behind a request that must still be running when the client acts (the engine does not wait for it).
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=256,
                                    block_size=1024)).eval()
    engine = Engine(model, tok, block_size=16, max_running=1, prefill_chunk=64)
    app = create_app(engine, tok, model_name="tiny", limits=Limits(max_waiting=1, max_tokens=1000))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield SimpleNamespace(url=url, engine=engine, http=http)


LONG = {"model": "tiny", "prompt": "the", "max_tokens": 1000, "stream": True, "ignore_eos": True}


def test_disconnect_mid_stream_frees_the_blocks(slow):
    before = slow.engine.stats()["tokens_generated"]
    with slow.http.stream("POST", "/v1/completions", json=LONG) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
        assert slow.engine.stats()["running"] == 1
    stats = wait_idle(slow.engine)
    assert (stats["running"], stats["waiting"], stats["blocks_used"]) == (0, 0, 0)
    assert stats["tokens_generated"] - before < 1000  # cancelled, not run to the end
    short = {**LONG, "stream": False, "max_tokens": 2}
    assert slow.http.post("/v1/completions", json=short).status_code == 200


def test_disconnect_while_waiting_for_a_whole_reply_frees_the_blocks(slow):
    before = slow.engine.stats()["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        slow.http.post("/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
    stats = wait_idle(slow.engine)
    assert (stats["running"], stats["waiting"], stats["blocks_used"]) == (0, 0, 0)
    assert stats["tokens_generated"] - before < 1000


def test_a_full_queue_answers_429_with_retry_after(slow):
    with slow.http.stream("POST", "/v1/completions", json=LONG) as first:
        lines = first.iter_lines()  # kept: a dropped line iterator closes the response
        next(line for line in lines if line.startswith("data: "))  # running now
        with slow.http.stream("POST", "/v1/completions", json=LONG) as second:  # waits for the slot
            assert second.status_code == 200
            stats = slow.engine.stats()
            assert (stats["running"], stats["waiting"]) == (1, 1), str(stats)
            third = slow.http.post("/v1/completions", json=LONG)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["type"] == "rate_limit_error"
    stats = wait_idle(slow.engine)
    assert (stats["running"], stats["waiting"], stats["blocks_used"]) == (0, 0, 0)
    short = {**LONG, "stream": False, "max_tokens": 2}
    assert slow.http.post("/v1/completions", json=short).status_code == 200


# ----- the commands -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_ckpt(tmp_path_factory):
    """A quantized (RTN int8) checkpoint with its tokenizer."""
    tok = tokenizer()
    model = quantize(tiny_model(tok), "rtn", bits=8, progress=False)
    path = tmp_path_factory.mktemp("int8") / "ckpt"
    model.save(path)
    tok.save(path / "tokenizer")
    return path


def test_llmlab_serve_serves_a_quantized_checkpoint(int8_ckpt):
    cmd = [sys.executable, "-m", "llmlab", "serve", str(int8_ckpt), "--port", "0", "--api-key", "k",
           "--log-level", "warning", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(1)]
        while "serving" not in lines[-1] and lines[-1]:
            lines.append(proc.stderr.readline())
        url = re.search(r"http://[\d.]+:\d+", lines[-1]).group(0)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["ckpt"]
        r = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode in (0, 130), proc.stderr.read()


def test_llmlab_chat_streams_replies_with_the_server_template(int8_ckpt, capsys, monkeypatch):
    engine, tok = load_engine(int8_ckpt, device="cpu")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    expected = "".join(chat_reply(engine, tok, messages, {"temperature": 0, "max_tokens": 6})[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat?\n/reset\nthe cat?\n"))
    code = main(["chat", str(int8_ckpt), "--system", "be brief", "--temperature", "0", "--max-tokens", "6",
                 "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == f"{expected}\n{expected}\n"  # /reset: the same question, same reply
