"""The chat page at / in a real headless browser (Debian's chromium driven by playwright): it loads and finds
the model, a message sent shows the reply streaming in (the same text the API gives), and Stop cancels a
reply and frees its KV blocks. Skipped, with one line saying what to install, where playwright or chromium
is missing; with LLMLAB_REQUIRE_BROWSER=1 (CI) that is a failure instead."""

from __future__ import annotations

import importlib.util
import os
import time

import httpx
import pytest
import torch

from llmlab.infer.engine import Engine
from llmlab.infer.server import BackgroundServer, create_app
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"


def missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the chat page test needs playwright: pip install playwright (browsers are not downloaded)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"the chat page test needs Debian's chromium at {CHROMIUM}: apt-get install chromium"
    return None


@pytest.fixture(scope="module")
def page_server():
    missing = missing_browser()
    if missing:
        (pytest.fail if os.environ.get("LLMLAB_REQUIRE_BROWSER") == "1" else pytest.skip)(missing)
    from playwright.sync_api import sync_playwright

    words = "the cat sat on a mat and the dog ran far away home while birds sang songs of the sea".split()
    texts = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(60)) + ".\n" for i in range(12)]
    tok = Tokenizer.train(texts, vocab_size=300, progress=False, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                                    block_size=1024)).eval()
    engine = Engine(model, tok, block_size=16, max_running=4, prefill_chunk=64)
    with BackgroundServer(create_app(engine, tok, model_name="tiny")) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield url, engine, browser
        finally:
            browser.close()


def test_page_streams_a_reply_and_stop_cancels(page_server):
    url, engine, browser = page_server
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("#system", "be brief")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#prompt", "the cat?")
    page.click("#send")
    page.wait_for_selector(".message.assistant:not(.streaming)")
    shown = page.inner_text(".message.assistant")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": 24}
    api = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    reply = api["choices"][0]["message"]["content"]
    assert reply and shown.startswith(reply)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    before = engine.stats()["tokens_generated"]
    page.click("#clear")
    page.fill("#max_tokens", "900")  # greedy, this conversation runs to max_tokens: Stop must end it
    page.fill("#prompt", "the cat?")
    page.click("#send")
    page.wait_for_function("document.querySelector('.message.assistant').textContent.length > 0")
    # Streamed: the reply grows on the page while it is still being generated (a short reply can arrive
    # in one network read, so this long one is where streaming shows).
    shown = len(page.text_content(".message.assistant"))
    page.wait_for_function("""(n) => { const m = document.querySelector('.message.assistant');
        return m.classList.contains('streaming') && m.textContent.length > n; }""", arg=shown)
    page.click("#stop")
    page.wait_for_selector(".message.assistant .note")
    assert "[stopped]" in page.inner_text(".message.assistant")
    assert page.is_enabled("#send")
    deadline = time.monotonic() + 20
    while engine.stats()["blocks_used"] or engine.stats()["running"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)
    assert engine.stats()["tokens_generated"] - before < 900  # the reply did not run to the end
    page.close()
