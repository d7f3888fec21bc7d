"""Formats: save/load round trips; parity with Hugging Face `tokenizers` both ways (our tokenizer exported,
and a tokenizer trained by `tokenizers` imported); unsupported or newer files fail with one clear error."""

from __future__ import annotations

import inspect
import json
import random
import string

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmlab.errors import TokenizerError
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.formats import byte_to_char, hf_to_bytes

TRAIN = [inspect.getsource(json), inspect.getsource(string),
         "Caf\u00e9 cr\u00e8me na\u00efve \u732b\u306f\u53ef\u611b\u3044 \U0001f600 "
         "\u0416\u0438\u0437\u043d\u044c "
         "strawberry embedding xylophone 2024 I'm\r\n" * 5]
HELD_OUT = [inspect.getsource(random)[:15000],
            "The \u732b sat on the \u30de\u30c3\u30c8. \U0001f44d\U0001f3fd na\u00efve\u0301 \u00e9t\u00e9 "
            "\u00df \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947 \t\t\n\n  x  \r\n "
            "123456789 you'LL",
            "", " ", "\n\n", "a", "   leading and trailing   ", "\x00\x01\x7f\x85"]


def hf_ids(hf: HFTokenizer, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TRAIN, vocab_size=700, progress=False)


def test_byte_alphabet_is_gpt2s():
    table = byte_to_char()
    assert len(set(table)) == 256 and table[ord("a")] == "a"
    assert table[32] == "\u0120" and table[10] == "\u010a"
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert hf_to_bytes("\u0120hello\u010a") == b" hello\n" and hf_to_bytes("\u732b") is None


def test_save_load_round_trip(tmp_path, tok):
    tok.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["llmlab.json", "tokenizer.json"]
    back = Tokenizer.load(tmp_path / "t")
    assert back.merges == tok.merges and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern and back.vocab_size == tok.vocab_size
    assert [back.encode(t) for t in HELD_OUT] == [tok.encode(t) for t in HELD_OUT]
    tok.save(tmp_path / "t")  # saving over a tokenizer directory replaces it
    meta = json.loads((tmp_path / "t" / "llmlab.json").read_text())
    assert meta["format_version"] == 1 and meta["tokens"] is None  # trained layout: table not stored


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_exported_tokenizer_json_encodes_identically_in_hf(tmp_path, pattern):
    ours = Tokenizer.train(TRAIN, vocab_size=600, pattern=pattern, progress=False)
    ours.to_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in HELD_OUT:
        ids = ours.encode(text)
        assert hf_ids(hf, text) == ids
        assert hf.decode(ids) == ours.decode(ids)
    specials = "<|bos|>hi<|eos|>"
    assert hf_ids(hf, specials) == ours.encode(specials, allowed_special="all")
    assert hf.get_vocab_size() == ours.vocab_size


def _train_hf(prefix_space: bool = False, full_alphabet: bool = True,
              split: str | None = None) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=split is None)
    hf.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                  show_progress=False, initial_alphabet=alphabet)
    hf.train_from_iterator(TRAIN, trainer=trainer)
    return hf


@pytest.mark.parametrize("prefix_space, full_alphabet, split", [
    (False, True, None),
    (True, True, None),
    (False, False, None),  # bytes never seen in training have no token: HF drops them, so must we
    (False, True, r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"),
    # Llama 3's pattern, a custom regex for us
    (False, True, r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
])
def test_tokenizer_trained_by_hf_imports_and_encodes_identically(tmp_path, prefix_space, full_alphabet,
                                                                   split):
    hf = _train_hf(prefix_space, full_alphabet, split)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    assert ours.uses_tiktoken
    # Without the full alphabet, text with a byte that has no token goes to the exact reference encoder
    # (HF drops such bytes and lets their neighbours merge); other text still goes through tiktoken.
    assert ours._covered(HELD_OUT[0]) and ours._covered(HELD_OUT[1]) == full_alphabet
    assert ours.eos_id == hf.token_to_id("<|endoftext|>") and ours.pad_id == hf.token_to_id("<pad>")
    for text in HELD_OUT:
        assert ours.encode(text) == hf_ids(hf, text), text[:40]
    assert ours.encode("a<pad>b", allowed_special="all") == hf_ids(hf, "a<pad>b")
    # and out again: our tokenizer.json of the import is read by HF as the same tokenizer
    ours.save(tmp_path / "again")
    hf2 = HFTokenizer.from_file(str(tmp_path / "again" / "tokenizer.json"))
    back = Tokenizer.load(tmp_path / "again")
    for text in HELD_OUT:
        assert hf_ids(hf2, text) == hf_ids(hf, text) == back.encode(text)


def test_bytes_without_tokens_are_dropped_like_hf(tmp_path):
    # HF drops a character that has no token and its neighbours become adjacent, so "a!b" merges to "ab".
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "c": 3}, merges=[("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    for text in ["a!b", "ab", "abc", "a\u732bb", "!!", "cab"]:
        assert ours.encode(text) == hf_ids(hf, text), text
    assert ours.encode("a!b") == [2] and ours.uses_tiktoken and not ours._covered("a!b")


def test_non_tiktoken_merge_list_matches_hf(tmp_path):
    # "abc" is a token but merge-list BPE cannot reach it from a, bc: HF and llmlab agree on [a, bc].
    tokens = [bytes([i]) for i in range(256)] + [b"bc", b"ab", b"abc"]
    ours = Tokenizer(tokens, [(98, 99), (97, 98), (257, 99)], "gpt4")
    ours.to_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc", "abcabc ab bc", "xabc\u732b"]:
        assert ours.encode(text) == hf_ids(hf, text)
    again = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    assert not again.uses_tiktoken and again.encode("abc") == [97, 256]


def test_from_tiktoken_export_to_hf(tmp_path, tok):
    import base64

    rank_file = tmp_path / "tok.tiktoken"
    n = 256 + len(tok.merges)
    rank_file.write_text("".join(f"{base64.b64encode(tok.token_bytes(i)).decode()} {i}\n" for i in range(n)))
    imported = Tokenizer.from_tiktoken(rank_file, "gpt4", specials=["<|eos|>"])
    assert imported.semantics == "ranks" and imported.eos_id == n
    imported.to_hf(tmp_path / "tokenizer.json")  # merges recovered from the ranks, like HF's own converter
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in HELD_OUT:
        assert imported.encode(text) == hf_ids(hf, text) == tok.encode(text)
    imported.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").encode(HELD_OUT[0]) == imported.encode(HELD_OUT[0])


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
def test_unsupported_hf_model_types_raise(tmp_path, model):
    if model == "wordpiece":
        hf = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    else:
        hf = HFTokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"model type '(WordPiece|Unigram)' is not supported"):
        Tokenizer.from_hf(tmp_path / "tokenizer.json")


def test_unsupported_hf_pieces_raise(tmp_path, tok):
    tok.to_hf(tmp_path / "tokenizer.json")
    base = json.loads((tmp_path / "tokenizer.json").read_text())
    cases = [
        ({"normalizer": {"type": "Lowercase"}}, "normalizer .* is not supported"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer .* is not supported"),
        ({"decoder": {"type": "WordPiece", "prefix": "##"}}, "decoder .* is not supported"),
        ({"model": {**base["model"], "dropout": 0.1}}, "dropout=0.1 makes encoding random"),
    ]
    for change, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_hf(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is not valid JSON"):
        Tokenizer.from_hf(tmp_path / "broken.json")


def test_load_refuses_newer_missing_and_corrupt(tmp_path, tok):
    tok.save(tmp_path / "t")
    meta_path = tmp_path / "t" / "llmlab.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 2, "llmlab_version": "9.0"}))
    with pytest.raises(TokenizerError,
                       match=r"format version 2, written by a newer llmlab \(9.0\).*upgrade llmlab"):
        Tokenizer.load(tmp_path / "t")
    meta_path.write_text(json.dumps({**meta, "merges": [[1, 99999]]}))
    with pytest.raises(TokenizerError, match="llmlab.json"):
        Tokenizer.load(tmp_path / "t")
    with pytest.raises(TokenizerError, match="does not exist; train one"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "hf_only").mkdir()
    tok.to_hf(tmp_path / "hf_only" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="import that with Tokenizer.from_hf"):
        Tokenizer.load(tmp_path / "hf_only")


def test_save_refuses_to_replace_a_foreign_directory(tmp_path, tok):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TokenizerError, match="is not a tokenizer directory"):
        tok.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- Oniguruma (tokenizers) vs Python regex: constructs the two read differently ----

DIGITS = ["1234567 89 0123456789012 a1b22c333d4444", "Pi is 3.14159265358979, e 2.718281828.\n\n  99999",
          "x\ny  \n\nz 12\n", "in 2024-10-01 at 12:34:56 UTC 1000000 people"]
# Oniguruma constructs whose Python-regex reading differs (or does not compile), each with a fallback.
ONIG_CONSTRUCTS = [r"\p{N}{1,3}+", r"\p{N}{2}+", r"\p{N}{1,}+", r"\p{N}{1,3}?+", r"\s+$", r"^\S+", r"\h+",
                   r"(?m:.+)", r"\s+\Z", r"(\p{N}{1,2})+", r"[\h]+"]


def _hf_split(pattern: str, text: str) -> list[str]:
    return [s for s, _ in pre_tokenizers.Split(Regex(pattern), "isolated").pre_tokenize_str(text)]


@pytest.mark.parametrize("construct", ONIG_CONSTRUCTS)
def test_oniguruma_construct_splits_like_tokenizers(construct):
    import regex

    from llmlab.tokenizer.patterns import from_oniguruma

    pattern = construct + r"|[\s\S]"
    ours = regex.compile(from_oniguruma(pattern))
    for text in DIGITS:
        assert [m.group() for m in ours.finditer(text)] == _hf_split(pattern, text), text


def _with_split(tmp_path, tok: Tokenizer, split_regex: str):
    """tok's tokenizer.json with its Split regex replaced by split_regex (the file as someone might
    write it)."""
    tok.to_hf(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": split_regex}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return tmp_path / "tokenizer.json"


def test_tiktoken_spelling_in_tokenizer_json_imports_with_tokenizers_ids(tmp_path):
    """cl100k's pattern copied verbatim into tokenizer.json: tokenizers reads \\p{N}{1,3}+ as runs of
    digits of any length, and so must the import (a possessive reading would cut them into threes)."""
    from llmlab.tokenizer import GPT4_PATTERN

    digit_runs = Tokenizer.train(TRAIN + DIGITS * 20, vocab_size=600, pattern="gpt2", progress=False)
    path = _with_split(tmp_path, digit_runs, GPT4_PATTERN)
    hf = HFTokenizer.from_file(str(path))
    imported = Tokenizer.from_hf(path)
    for text in DIGITS + HELD_OUT:
        assert imported.encode(text) == hf_ids(hf, text), text
    possessive = Tokenizer(digit_runs.spec().tokens, digit_runs.merges, GPT4_PATTERN,
                           digit_runs.special_tokens)
    assert imported.encode(DIGITS[0]) != possessive.encode(DIGITS[0])  # the two readings really differ here
    imported.to_hf(tmp_path / "again.json")  # and the export keeps tokenizers' reading
    again = HFTokenizer.from_file(str(tmp_path / "again.json"))
    assert all(hf_ids(again, text) == hf_ids(hf, text) for text in DIGITS)


@pytest.mark.parametrize("pattern", [r"\p{N}{1,3}+|\p{L}+|\s+$|\s+|[^\s\p{L}\p{N}]+",
                                     r"(?s:\p{N}{2}+.)|^\p{L}+|\p{L}+|\s+\Z|\s+|[\s\S]"])
def test_custom_pattern_exports_with_the_same_reading(tmp_path, pattern):
    ours = Tokenizer.train(TRAIN, vocab_size=500, pattern=pattern, progress=False)
    ours.to_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    back = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    for text in DIGITS + HELD_OUT:
        assert hf_ids(hf, text) == ours.encode(text) == back.encode(text), text


@pytest.mark.parametrize("pattern, direction, message", [
    (r"\h+|[\s\S]", "export", r"\\h \(horizontal whitespace\) in Python regex has no equivalent"),
    (r"(?m:^a)|[\s\S]", "export", r"the inline flag 'm' in Python regex has no equivalent"),
    (r"(?s:.+)|[\s\S]", "import", r"the inline flag 's' in Hugging Face tokenizers \(Oniguruma\)"),
    (r"[\H]+|[\s\S]", "import", r"\\H inside a character class"),
])
def test_untranslatable_constructs_are_refused_in_one_line(tmp_path, tok, pattern, direction, message):
    if direction == "export":
        custom = Tokenizer(tok.spec().tokens, tok.merges, pattern, tok.special_tokens)
        with pytest.raises(TokenizerError, match=message) as err:
            custom.to_hf(tmp_path / "tokenizer.json")
    else:
        with pytest.raises(TokenizerError, match=message) as err:
            Tokenizer.from_hf(_with_split(tmp_path, tok, pattern))
        assert "tokenizer.json" in str(err.value)
    assert "\n" not in str(err.value)
