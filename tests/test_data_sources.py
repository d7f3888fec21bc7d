"""Text sources: every supported kind yields the right documents in a deterministic order, and bad input
fails early with a DataError naming the file (and line) and the fix."""

from __future__ import annotations

import json

import pytest

from llmlab.data.sources import (
    describe_sources,
    iter_documents,
    stdlib_files,
    stdlib_root,
    stdlib_topics,
)
from llmlab.errors import DataError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_txt_files_and_globs_one_document_per_file_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first \u732b", encoding="utf-8")
    (tmp_path / "c.md").write_text("third", encoding="utf-8")
    assert list(iter_documents([str(tmp_path / "*.txt")])) == ["first \u732b", "second"]
    # Explicit files keep the order given; globs and directories are sorted.
    docs = iter_documents([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")])
    assert list(docs) == ["second", "first \u732b"]
    assert list(iter_documents([str(tmp_path)])) == ["first \u732b", "second", "third"]


def test_directory_recurses_and_skips_hidden_and_unsupported(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "x.txt").write_text("deep", encoding="utf-8")
    (tmp_path / "top.txt").write_text("top", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    _write_jsonl(tmp_path / "sub" / "r.jsonl", [{"text": "row"}])
    assert list(iter_documents(str(tmp_path))) == ["deep", "row", "top"]


def test_jsonl_text_field_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"text": ""}\n', encoding="utf-8")
    assert list(iter_documents([str(path)])) == ["one", "two"]  # empty documents are dropped
    _write_jsonl(path, [{"body": "x"}, {"body": "y"}])
    assert list(iter_documents([str(path)], text_field="body")) == ["x", "y"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents([str(path)]))
    path.write_text('{"text": "ok"}\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text' \(keys: content\).*--text-field"):
        list(iter_documents([str(path)]))
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' is int"):
        list(iter_documents([str(path)]))
    path.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected a JSON object"):
        list(iter_documents([str(path)]))


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta", ""], "n": [1, 2, 3, 4]}), path)
    assert list(iter_documents([str(path)])) == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        list(iter_documents([str(path)], text_field="body"))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"pip install llmlab\[parquet\]"):
        iter_documents([str(path)])


def test_missing_empty_and_nothing_matching_fail_before_iteration(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        iter_documents([str(tmp_path / "nope.txt")])  # raised on the call, not on first next()
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        iter_documents([str(tmp_path / "empty.txt")])
    with pytest.raises(DataError, match=r"matches no files"):
        iter_documents([str(tmp_path / "*.jsonl")])
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"contains no"):
        iter_documents([str(tmp_path / "d")])
    with pytest.raises(DataError, match="no text sources"):
        iter_documents([])


def test_empty_corpus_and_textless_file(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl holds no text"):
        list(iter_documents([str(path)]))
    (tmp_path / "g").mkdir()
    _write_jsonl(tmp_path / "g" / "e.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="corpus is empty"):
        list(iter_documents([str(tmp_path / "g")]))


def test_non_utf8_text_names_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt is not valid UTF-8.*iconv"):
        list(iter_documents([str(path)]))


def test_max_chars_cuts_exactly(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("x" * 10, encoding="utf-8")
    docs = list(iter_documents([str(tmp_path)], max_chars=25))
    assert [len(d) for d in docs] == [10, 10, 5]
    with pytest.raises(DataError, match="max_chars"):
        iter_documents([str(tmp_path)], max_chars=0)


def test_stdlib_corpus_excludes_tests_and_is_deterministic():
    files = stdlib_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    dirs = {part for r in rel for part in r.split("/")[:-1]}
    assert not dirs & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(r.startswith(("lib2to3/tests", "test/", "idlelib/idle_test")) for r in rel)
    topics = stdlib_topics()
    assert len(topics) > 50 and any("if_stmt" in t or "The \"if\" statement" in t for t in topics)
    # The first documents are the first sorted files' text; max_chars keeps this cheap.
    first = next(iter(iter_documents("stdlib", max_chars=200)))
    assert first == files[0].read_text(encoding="utf-8")[:200] or len(first) == 200
    summary = describe_sources(["stdlib"])[0]
    assert summary["kind"] == "stdlib" and summary["files"] == len(files)
    assert 8_000_000 < summary["bytes"] < 20_000_000  # "about 11 MB" of real text


def test_bom_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    assert list(iter_documents([str(tmp_path / "bom.txt")])) == ["hello"]
