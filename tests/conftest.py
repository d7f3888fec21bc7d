"""Shared fixtures: tiny corpora made on the fly, never downloads."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so a red CI run always means a change broke something;
# HYPOTHESIS_PROFILE=explore draws fresh ones (run it when hunting for new counter-examples).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

torch.set_num_threads(1)  # also for module-scoped fixtures, which run before the per-test fixture below


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny test models run fastest on one thread (OpenMP barriers stall on a busy machine), and one
    thread keeps results independent of the core count. Restored after each test, since code under test
    (e.g. train.threads) may change it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_corpus() -> list[str]:
    """A few paragraphs of varied real-ish text (ASCII, unicode, code, numbers)."""
    return [
        "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
        "In 1905 Einstein published four papers. Their ideas changed physics for ever.\n",
        "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade, \u732b\u306f\u53ef\u611b\u3044 \U0001f600 emoji!\n",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n" * 3,
    ]
