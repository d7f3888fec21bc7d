"""Tokenizer files are validated on load: a damaged llmlab.json, tokenizer.json or .tiktoken file is one
TokenizerError line naming the file (invalid JSON, wrong types, missing keys, ids out of range or shared,
merges naming unknown tokens, patterns that do not compile, colliding specials, truncation, non-UTF-8),
never a traceback or a tokenizer that loads and misbehaves later. Property-based: random JSON mutations
give a TokenizerError or a tokenizer that encodes and decodes."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.errors import TokenizerError
from llmlab.tokenizer import Tokenizer

TEXTS = ["Hello world, 12345 tokens!\n", "na\u00efve \u732b \U0001f600", "  spaces\tand\ttabs  "]
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A small trained tokenizer saved as llmlab.json + tokenizer.json."""
    tok = Tokenizer.train(TEXTS * 20, vocab_size=300, progress=False)
    directory = tmp_path_factory.mktemp("tok") / "t"
    tok.save(directory)
    return directory


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "t"))


def _refused(load, path_fragment: str, message: str) -> None:
    with pytest.raises(TokenizerError, match=message) as err:
        load()
    assert "\n" not in str(err.value) and path_fragment in str(err.value), str(err.value)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


LLMLAB_CASES = [
    ("merges", lambda d: d.pop("merges"), "missing key 'merges'"),
    ("version", lambda d: d.update(format_version="1"), "no positive integer format_version"),
    ("merge type", lambda d: d.update(merges=[[1, "2"]]), r"merge #0 has id '2'"),
    ("merge shape", lambda d: d.update(merges=[[1, 2, 3]]), r"merge #0 is \[1, 2, 3\], not a pair"),
    ("merge bool", lambda d: d.update(merges=[[True, 2]]), r"merge #0 has id True"),
    ("merge ahead", lambda d: d.update(merges=[[300, 1]]), r"merge #0 \(300, 1\) uses a token no earlier"),
    ("merges type", lambda d: d.update(merges={"a": 1}), "merges is dict, not list"),
    ("tokens type", lambda d: d.update(tokens="abc"), "tokens is str, not list"),
    ("token base64", lambda d: d.update(tokens=[*d["__table"][:3], "***", *d["__table"][4:]]),
     "token 3 is not valid base64"),
    ("token empty", lambda d: d.update(tokens=[*d["__table"][:3], "", *d["__table"][4:]]),
     "token 3 is empty"),
    ("token twice", lambda d: d.update(tokens=[*d["__table"][:4], d["__table"][3], *d["__table"][5:]]),
     "tokens 3 and 4 are both"),
    ("merge makes unknown",
     lambda d: d.update(tokens=[*d["__table"][:-1], base64.b64encode(b"zz~").decode()]),
     "makes a token that is not in the vocabulary"),
    ("special id type", lambda d: d.update(special_tokens={"<|eos|>": "5"}), "'<|eos|>' has id '5'"),
    ("special on token", lambda d: d.update(special_tokens={"<|eos|>": 65}), "reuses id 65 of the regular"),
    ("specials share", lambda d: d.update(special_tokens={"<|a|>": 400, "<|b|>": 400}), "share one id"),
    ("special huge", lambda d: d.update(special_tokens={"<|a|>": 10**12}), "has invalid id 1000000000000"),
    ("special empty", lambda d: d.update(special_tokens={"": 400}), "special token '' must be a non-empty"),
    ("normalizer", lambda d: d["options"].update(normalizer="XYZ"), "option normalizer='XYZ'"),
    ("bool option", lambda d: d["options"].update(prefix_space="yes"), "prefix_space='yes' must be true or"),
    ("unknown option", lambda d: d["options"].update(colour=1), "unknown option 'colour'"),
    ("unk id", lambda d: d["options"].update(unk_id=10**6), "unk id 1000000 is not a token"),
    ("pattern syntax", lambda d: d.update(pattern="(", pattern_name=None), "is not a valid regular"),
    ("pattern tiktoken", lambda d: d.update(pattern=r"\X|[\s\S]", pattern_name=None),
     "does not compile in tiktoken's regex engine"),
    ("pattern group", lambda d: d.update(pattern=r"(\p{L}+)|[\s\S]", pattern_name=None), "capturing group"),
    ("pattern type", lambda d: d.update(pattern=5), "pattern is int, not str"),
    ("semantics", lambda d: d.update(semantics="bpe"), "semantics must be 'merges' or 'ranks'"),
]


@pytest.mark.parametrize("name, change, message", LLMLAB_CASES, ids=[c[0] for c in LLMLAB_CASES])
def test_damaged_llmlab_json_is_one_line(copy, name, change, message):
    tok = Tokenizer.load(copy)
    table = [base64.b64encode(tok.token_bytes(i)).decode() for i in range(256 + len(tok.merges))]

    def edit(data):
        data["__table"] = table
        change(data)
        del data["__table"]

    _edit(copy / "llmlab.json", edit)
    _refused(lambda: Tokenizer.load(copy), "llmlab.json", message)


@pytest.mark.parametrize("raw, message", [
    (lambda text: text[: len(text) // 2], "is not valid JSON"),
    (lambda text: "\ufeff" + text, "is not valid JSON"),
    (lambda text: "[" * 100000 + "]" * 100000, "nests JSON too deeply|is not an llmlab tokenizer file"),
    (lambda text: "[1, 2]", "is not an llmlab tokenizer file"),
])
def test_truncated_or_garbled_llmlab_json(copy, raw, message):
    path = copy / "llmlab.json"
    path.write_text(raw(path.read_text()))
    _refused(lambda: Tokenizer.load(copy), "llmlab.json", message)


def test_non_utf8_and_unreadable_files(copy):
    (copy / "llmlab.json").write_bytes(b"\xff\xfe" + (copy / "llmlab.json").read_bytes())
    _refused(lambda: Tokenizer.load(copy), "llmlab.json", "is not valid JSON")
    (copy / "llmlab.json").unlink()
    (copy / "llmlab.json").mkdir()
    _refused(lambda: Tokenizer.load(copy), "llmlab.json", "not found|cannot read")
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").mkdir()
    _refused(lambda: Tokenizer.from_hf(copy / "tokenizer.json"), "tokenizer.json",
             "does not exist|cannot read")


def _model(change):
    return lambda d: change(d["model"])


HF_CASES = [
    ("vocab id type", _model(lambda m: m["vocab"].update(a="5")), r"vocab entry 'a' has id '5'"),
    ("vocab shared id", _model(lambda m: m["vocab"].update(a=m["vocab"]["b"])), "share id"),
    ("vocab negative", _model(lambda m: m["vocab"].update(a=-1)), r"vocab entry 'a' has id -1"),
    ("vocab far id", _model(lambda m: m["vocab"].update(a=10**9)), "id 1000000000 is far past"),
    ("vocab type", _model(lambda m: m.update(vocab=[1, 2])), "vocab is list, not dict"),
    ("vocab not bytes", _model(lambda m: m["vocab"].update({"\u732b": 350})), "is not a byte-level string"),
    ("merge unknown", _model(lambda m: m.update(merges=[["a", "\u0120nope"]])), "is not a pair of tokens"),
    ("merge shape", _model(lambda m: m.update(merges=[["a", "b", "c"]])), "is not a pair of tokens"),
    ("merges type", _model(lambda m: m.update(merges=5)), "merges is int, not list"),
    ("merge makes unknown", _model(lambda m: m.update(merges=[["~", "~"]])), "makes a token that is not in"),
    ("unk missing", _model(lambda m: m.update(unk_token="<nope>")), "unk_token '<nope>' is neither"),
    ("flag type", _model(lambda m: m.update(ignore_merges="false")), "ignore_merges='false' is not true"),
    ("added no content", lambda d: d.update(added_tokens=[{"id": 299}]), r"added_tokens\[0\] is not an"),
    ("added shared id", lambda d: d.update(added_tokens=[{"id": 299, "content": "<a>"},
                                                         {"id": 299, "content": "<b>"}]), "share id 299"),
    ("added two ids", lambda d: d.update(added_tokens=[{"id": 299, "content": "<a>"},
                                                       {"id": 300, "content": "<a>"}]),
     "listed with ids 299 and 300"),
    ("added type", lambda d: d.update(added_tokens={"a": 1}), "added_tokens is dict, not list"),
    ("split pattern type", lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern="\\s+"),
     "pre_tokenizer .* is not supported"),
    ("split regex", lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": "("}),
     "is not a valid regular expression"),
    ("byte level flag", lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(use_regex="no"),
     "use_regex='no' is not true or false"),
    ("decoder", lambda d: d.update(decoder={"type": "Sequence", "decoders": 5}), "decoder .* not supported"),
    ("normalizer", lambda d: d.update(normalizer={"type": "Sequence", "normalizers": 3}),
     "normalizer .* not supported"),
    ("no model", lambda d: d.pop("model"), "has no \"model\" object"),
]


@pytest.mark.parametrize("name, change, message", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_damaged_tokenizer_json_is_one_line(copy, name, change, message):
    _edit(copy / "tokenizer.json", change)
    _refused(lambda: Tokenizer.from_hf(copy / "tokenizer.json"), "tokenizer.json", message)


def test_truncated_tokenizer_json(copy):
    path = copy / "tokenizer.json"
    path.write_text(path.read_text()[:-100])
    _refused(lambda: Tokenizer.from_hf(path), "tokenizer.json", "is not valid JSON")


def _tiktoken_file(directory: Path, extra: bytes = b"") -> Path:
    path = directory / "ranks.tiktoken"
    lines = [base64.b64encode(bytes([b])) + b" " + str(b).encode() for b in range(256)]
    path.write_bytes(b"\n".join(lines) + b"\n" + extra)
    return path


@pytest.mark.parametrize("extra, specials, message", [
    (base64.b64encode(b"ab") + b" 99999999999", None, "id 99999999999 is far past"),
    (b"\xff\xfe garbage", None, r"ranks\.tiktoken:257: expected '<base64 token> <rank>'"),
    (base64.b64encode(b"ab") + b" 5", None, r"rank 5 or token b'ab' is negative, empty or repeated"),
    (b"", {"<|eos|>": "256"}, "special token '<|eos|>' has id '256'"),
    (b"", {"<|eos|>": 3}, "reuses id 3 of the regular token"),
    (b"", ["<|a|>", "<|a|>"], "special token '<|a|>' is listed twice"),
    (b"", "<|a|>", "not the string '<|a|>'"),
])
def test_damaged_tiktoken_file_is_one_line(tmp_path, extra, specials, message):
    path = _tiktoken_file(tmp_path, extra)
    _refused(lambda: Tokenizer.from_tiktoken(path, specials=specials), "ranks.tiktoken", message)


def test_tiktoken_file_with_unused_ids_before_its_specials_loads(tmp_path):
    """cl100k leaves id 100256 unused before its specials: holes are fine, just not absurd ones."""
    tok = Tokenizer.from_tiktoken(_tiktoken_file(tmp_path), specials={"<|endoftext|>": 300})
    assert tok.vocab_size == 301 and tok.encode("<|endoftext|>hi", allowed_special="all")[0] == 300


# ---- properties: random JSON mutations load or are refused in one line ----

_SCALARS = st.none() | st.booleans() | st.integers(-3, 400) | st.text(max_size=4)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=4)


def _mutate(data, keys: list, value, delete: bool) -> bool:
    """Set (or delete) the item at `keys` in nested JSON data; False if the path does not exist."""
    node = data
    for key in keys[:-1]:
        try:
            node = node[key if not isinstance(node, list) else key % max(len(node), 1)]
        except (KeyError, IndexError, TypeError):
            return False
    last = keys[-1]
    try:
        if isinstance(node, list):
            last = last if isinstance(last, int) else 0
            last %= max(len(node), 1)
        if delete:
            del node[last]
        else:
            node[last] = value
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _loads_or_refuses(load, fragment: str) -> None:
    try:
        tok = load()
    except TokenizerError as e:
        assert "\n" not in str(e) and fragment in str(e)
        return
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="none")
        assert all(0 <= i < tok.vocab_size for i in ids)
        tok.decode(ids)


LLMLAB_KEYS = ["format", "format_version", "pattern", "special_tokens", "merges", "tokens", "options",
               "semantics", "vocab_size", "<|eos|>", "normalizer", "unk_id", "prefix_space", "ignore_merges",
               0, 1, 5, 40]
HF_KEYS = ["model", "vocab", "merges", "added_tokens", "pre_tokenizer", "decoder", "normalizer",
           "pretokenizers", "pattern", "Regex", "type", "unk_token", "ignore_merges", "fuse_unk", "content",
           "id", "use_regex", "a", "\u0120t", 0, 1, 3]


@PROPERTY
@given(keys=st.lists(st.sampled_from(LLMLAB_KEYS), min_size=1, max_size=3), value=_JSON, delete=st.booleans())
def test_random_llmlab_json_mutations(saved, tmp_path, keys, value, delete):
    directory = Path(shutil.copytree(saved, tmp_path / "m", dirs_exist_ok=True))
    data = json.loads((directory / "llmlab.json").read_text())
    if _mutate(data, keys, value, delete):
        (directory / "llmlab.json").write_text(json.dumps(data))
        _loads_or_refuses(lambda: Tokenizer.load(directory), "llmlab.json")


@PROPERTY
@given(keys=st.lists(st.sampled_from(HF_KEYS), min_size=1, max_size=4), value=_JSON, delete=st.booleans())
def test_random_tokenizer_json_mutations(saved, tmp_path, keys, value, delete):
    path = tmp_path / "tokenizer.json"
    data = json.loads((saved / "tokenizer.json").read_text())
    if _mutate(data, keys, value, delete):
        path.write_text(json.dumps(data))
        _loads_or_refuses(lambda: Tokenizer.from_hf(path), "tokenizer.json")


def test_a_file_where_the_tokenizer_directory_belongs(copy):
    _refused(lambda: Tokenizer.load(copy / "tokenizer.json"), "tokenizer.json",
             "is a file, not a tokenizer directory.*Tokenizer.from_hf")
