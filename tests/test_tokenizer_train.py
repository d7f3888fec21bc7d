"""BPE training: the incremental trainer learns exactly the merges of a naive recount-everything BPE,
merges stay inside regex chunks, counting in processes changes nothing, and bad options fail clearly."""

from __future__ import annotations

import collections
import re
import warnings

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.errors import TokenizerError
from llmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from llmlab.tokenizer.patterns import ascii_twin
from llmlab.tokenizer.train import count_batch, count_chunks, learn_merges, split_document

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n        x = 10000000\n",
    "aaaaaaa aaaa aaa bbbb ==== ---- ....    \n\n\n\t\t  zzzzzz",
    "Caf\u00e9 cr\u00e8me, na\u00efve, \u732b\u306f\u53ef\u611b\u3044 \U0001f600\U0001f600 "
    "I'm you'll WE'RE\r\n",
] * 3


def naive_bpe(counts: dict[str, int], n_merges: int) -> list[tuple[int, int]]:
    """BPE by brute force: recount every pair after every merge; ties -> smallest (left, right)."""
    words = [(list(w.encode()), n) for w, n in counts.items()]
    merges = []
    for step in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, n in words:
            for p in zip(w, w[1:], strict=False):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new = 256 + step
        for w, _ in words:
            i = 0
            while i < len(w) - 1:  # left to right, so "aaa" -> [aa, a]
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [new]
                i += 1
        merges.append(best)
    return merges


def test_incremental_merges_equal_naive_bpe():
    counts = count_chunks(TEXTS, GPT4_PATTERN, "gpt4", progress=False)
    assert learn_merges(counts, 150, progress=False) == naive_bpe(counts, 150)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("ab c", min_size=1, max_size=12), st.integers(1, 9), min_size=1, max_size=25),
       st.integers(1, 40))
def test_incremental_merges_equal_naive_bpe_on_repetitive_words(counts, n_merges):
    # Small alphabets make many overlapping pairs (aaa, abab), the hard case for in-place updates.
    merges = learn_merges(counts, n_merges, progress=False)
    assert merges == naive_bpe(counts, n_merges)
    # ...and the hard case for tiktoken exactness: every trained merge list must pass the check.
    tokens = [bytes([i]) for i in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    assert Tokenizer(tokens, merges, "gpt4").uses_tiktoken


def test_vocab_layout_specials_and_role_ids():
    tok = Tokenizer.train(TEXTS, vocab_size=320, progress=False)
    assert tok.vocab_size == 320 and len(tok.merges) == 320 - 256 - len(DEFAULT_SPECIAL_TOKENS)
    assert list(tok.special_tokens) == list(DEFAULT_SPECIAL_TOKENS)
    assert sorted(tok.special_tokens.values()) == list(range(313, 320))  # appended after the merges
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (313, 314, 315)
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    for i, (a, b) in enumerate(tok.merges):  # merge i makes id 256 + i from two earlier ids
        assert a < 256 + i and b < 256 + i
        assert tok.token_bytes(256 + i) == tok.token_bytes(a) + tok.token_bytes(b)
    none = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=[], progress=False)
    assert none.special_tokens == {} and none.eos_id is None and len(none.merges) == 44


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_merges_never_cross_chunk_boundaries(pattern):
    tok = Tokenizer.train(TEXTS, vocab_size=400, pattern=pattern, special_tokens=[], progress=False)
    chunks = {c.encode() for t in TEXTS for c in regex.findall(tok.pattern, t)}
    for i in range(256, tok.vocab_size):
        piece = tok.token_bytes(i)
        assert any(piece in c for c in chunks), piece


def test_training_is_deterministic_and_independent_of_processes():
    one = count_chunks(TEXTS * 4, GPT4_PATTERN, "gpt4", workers=1, progress=False, batch_chars=300)
    two = count_chunks(TEXTS * 4, GPT4_PATTERN, "gpt4", workers=2, progress=False, batch_chars=300)
    assert one == two  # the process pool path (forced by tiny batches) counts exactly the same
    a = Tokenizer.train(TEXTS, vocab_size=330, progress=False, workers=1)
    b = Tokenizer.train(list(reversed(TEXTS)), vocab_size=330, progress=False, workers=2)
    assert a.merges == b.merges  # document order does not matter either


def test_max_chars_caps_the_text_read():
    capped = Tokenizer.train(TEXTS, vocab_size=300, max_chars=100, progress=False)
    head = 100 - len(TEXTS[0])  # the cap falls inside the second document
    expected = Tokenizer.train([TEXTS[0], TEXTS[1][:head]], vocab_size=300, progress=False)
    assert 0 < head < len(TEXTS[1]) and capped.merges == expected.merges


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(max_codepoint=127), max_size=60))
def test_ascii_fast_path_splits_like_the_unicode_pattern(text):
    for name, pattern in [("gpt4", GPT4_PATTERN), ("gpt2", GPT2_PATTERN)]:
        assert ascii_twin(name).findall(text) == regex.findall(pattern, text)


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from(list("ab1.\u00e9 \t\r\n\n\n")), max_size=120), st.integers(1, 30))
def test_huge_documents_split_without_changing_chunks(doc, size):
    # Training cuts documents longer than a batch at "x\ny" newlines; the chunk counts must not change.
    pieces = split_document(doc, size)
    assert "".join(pieces) == doc
    for name, pattern in [("gpt4", GPT4_PATTERN), ("gpt2", GPT2_PATTERN)]:
        assert count_batch(pieces, pattern, name) == count_batch([doc], pattern, name)


def test_long_document_is_counted_in_pieces():
    doc = "".join(TEXTS) * 5
    assert len(split_document(doc, 500)) > 5
    whole = count_chunks([doc], GPT4_PATTERN, "gpt4", progress=False, batch_chars=10**9)
    assert count_chunks([doc], GPT4_PATTERN, "gpt4", progress=False, batch_chars=500, workers=2) == whole


def test_custom_pattern_and_uncovered_text():
    tok = Tokenizer.train(TEXTS, vocab_size=300, pattern=r"\w+|\s+|[^\w\s]+", special_tokens=[],
                          progress=False)
    assert tok.pattern_name is None and tok.decode(tok.encode("héllo, wörld!")) == "héllo, wörld!"
    with pytest.raises(TokenizerError, match="does not match every character.*skips ' '"):
        Tokenizer.train(["hello world"], vocab_size=300, pattern=r"\w+", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 262}, r"below 256 byte tokens \+ 7 special tokens = 263; pass vocab_size >= 263"),
    ({"vocab_size": 257, "special_tokens": ["<a>", "<b>"]}, "pass vocab_size >= 258"),
    ({"pattern": "gtp4"}, r"unknown pattern name 'gtp4' \(did you mean 'gpt4'\?\)"),
    ({"pattern": "(unclosed"}, "not a valid regular expression"),
    ({"pattern": r"\w*"}, "can match the empty string"),
    ({"special_tokens": ["<x>", "<x>"]}, "listed twice"),
    ({"max_chars": 0}, "max_chars=0 must be a positive integer"),
])
def test_bad_options_raise_tokenizer_error(kwargs, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.train(TEXTS, **{"vocab_size": 300, "progress": False, **kwargs})


def test_empty_corpus_and_non_text_input():
    with pytest.raises(TokenizerError, match="corpus is empty"):
        Tokenizer.train([], vocab_size=300, progress=False)
    with pytest.raises(TokenizerError, match="corpus is empty"):
        Tokenizer.train(["", ""], vocab_size=300, progress=False)
    with pytest.raises(TokenizerError, match=r"got a single str; wrap it in a list"):
        Tokenizer.train("just one string", vocab_size=300, progress=False)
    with pytest.raises(TokenizerError, match=re.escape("training text #1 is a bytes, not a str")):
        Tokenizer.train(["ok", b"bytes"], vocab_size=300, progress=False)


def test_small_corpus_stops_early_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.train(["abab"], vocab_size=400, special_tokens=["<e>"], progress=False)
    assert [str(w.message) for w in caught if "only supports" in str(w.message)]
    assert tok.merges == [(97, 98), (256, 256)] and tok.special_tokens == {"<e>": 258}
    assert tok.encode("ababab") == [257, 256]
