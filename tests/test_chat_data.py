"""SFT and preference records in TRL's formats (JSONL and Parquet), every malformed case naming file, line and
field, and their encoding with the chat template."""

from __future__ import annotations

import json

import pytest

from llmlab.data.chat_data import (
    PreferencePair,
    SFTExample,
    encode_preference,
    encode_sft,
    read_preferences,
    read_sft,
)
from llmlab.errors import DataError

U = {"role": "user", "content": "2+2?"}
A = {"role": "assistant", "content": "4"}
B = {"role": "assistant", "content": "5"}
S = {"role": "system", "content": "be brief"}


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


# ----- SFT formats -----
@pytest.mark.parametrize("kind", WRITERS)
def test_sft_formats(kind, tmp_path):
    records = [
        {"messages": [S, U, A], "id": 7},                                     # extra keys are ignored
        {"prompt": "2+2?", "completion": "4"},                                # text prompt/completion
        {"prompt": [U, A, U], "completion": [B]},                             # conversational
    ]
    if kind == "parquet":  # one schema per file: each format in a file of its own
        got = [read_sft(write_parquet(tmp_path / f"{i}.parquet", [r]))[0] for i, r in enumerate(records)]
    else:
        got = read_sft(write_jsonl(tmp_path / "sft.jsonl", records))
    assert [e.messages for e in got] == [[S, U, A], [U, A], [U, A, U, B]]
    assert [e.train_from for e in got] == [0, 1, 3]
    where = got[0].where
    assert where.endswith(":1" if kind == "jsonl" else ":row 1")


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [U, A]}, "", "   ", {"messages": [U, B]}])
    got = read_sft(path)
    assert [e.where for e in got] == [f"{path}:1", f"{path}:4"]


def test_parquet_rows_are_numbered(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [{"messages": [U, A]}, {"messages": [U, {"role": "tool",
                                                                                          "content": "x"}]}])
    with pytest.raises(DataError, match=r"s\.parquet:row 2: field messages\[1\]\.role is 'tool'"):
        read_sft(path)


# ----- preference formats -----
@pytest.mark.parametrize("kind", WRITERS)
def test_preference_formats(kind, tmp_path):
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [U], "chosen": [A], "rejected": [B], "task": "add"},
        {"chosen": [S, U, A], "rejected": [S, U, B]},                        # implicit prompt
        {"prompt": [U], "chosen": [U, A], "rejected": [U, B]},                # whole conversations
    ]
    if kind == "parquet":
        got = [read_preferences(write_parquet(tmp_path / f"{i}.parquet", [r]))[0]
               for i, r in enumerate(records)]
    else:
        got = read_preferences(write_jsonl(tmp_path / "p.jsonl", records))
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [
        ([U], [A], [B]), ([U], [A], [B]), ([S, U], [A], [B]), ([U], [A], [B])]
    assert got[1].extra == {"task": "add"}


def test_implicit_prompt_keeps_multi_turn_answers(tmp_path):
    follow = {"role": "user", "content": "sure?"}
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": [U, A, follow, A], "rejected": [U, B, follow, B]}])
    [pair] = read_preferences(path)
    assert pair.prompt == [U] and pair.chosen == [A, follow, A] and pair.rejected == [B, follow, B]


# ----- malformed records: file, line and field named -----
SFT_BAD = [
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}, ', "invalid JSON"),
    ('{"text": "plain"}', "no field messages"),
    ('{"messages": "hello"}', "field messages is str"),
    ('{"messages": []}', "field messages is an empty list"),
    ('{"messages": ["hi"]}', "field messages[0] is str"),
    ('{"messages": [{"content": "hi"}]}', "field messages[0] has no 'role'"),
    ('{"messages": [{"role": "user"}]}', "field messages[0] has no 'content'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "field messages[0].role is 'bot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "field messages[0].content is int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "field messages has no assistant message"),
    ('{"prompt": "hi"}', "no field messages (or prompt and completion)"),
    ('{"prompt": "hi", "completion": 4}', "field completion is int"),
    ('{"prompt": 3, "completion": "4"}', "field prompt is int"),
    ('{"prompt": "hi", "completion": [{"role": "assistant", "content": "4"}]}', "field prompt is str while"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}',
     "field completion has no assistant message"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant"}]}',
     "field completion[0] has no 'content'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}', "read it with read_preferences"),
]

PREF_BAD = [
    ('{"prompt": "hi", "chosen": "4"}', "no field rejected"),
    ('{"prompt": "hi", "rejected": "4"}', "no field chosen"),
    ('{"chosen": "4", "rejected": "5"}', "string chosen/rejected need a string prompt"),
    ('{"prompt": "hi", "chosen": 4, "rejected": "5"}', "field chosen is int"),
    ('{"prompt": "hi", "chosen": "4", "rejected": null}', "field rejected is NoneType"),
    ('{"prompt": "hi", "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": '
     '"assistant", "content": "5"}]}', "field prompt is str while chosen, rejected are"),
    ('{"chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": '
     '"5"}]}', "share no leading messages"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}, {"role": '
     '"assistant", "content": "5"}]}', "field chosen is all prompt"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], '
     '"rejected": [{"role": "assistant", "content": "5"}]}', "field chosen has no assistant message"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "4"}], '
     '"rejected": [{"role": "narrator", "content": "5"}]}', "field rejected[0].role is 'narrator'"),
    ('{"prompt": [], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", '
     '"content": "5"}]}', "field prompt is an empty list"),
]


def _check_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("line,fragment", SFT_BAD)
def test_malformed_sft_record(line, fragment, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}, "", line])
    with pytest.raises(DataError) as excinfo:
        read_sft(path)
    _check_one_line(excinfo, f"{path}:3: ", fragment)


@pytest.mark.parametrize("line,fragment", PREF_BAD)
def test_malformed_preference_record(line, fragment, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, line])
    with pytest.raises(DataError) as excinfo:
        read_preferences(path)
    _check_one_line(excinfo, f"{path}:2: ", fragment)


@pytest.mark.parametrize("reader", [read_sft, read_preferences])
def test_bad_files(reader, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'\n{"x": "caf\xe9"}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    cases = [("missing.jsonl", "does not exist"), ("empty.jsonl", "holds no"), (".", "is a directory"),
             ("latin1.jsonl", "latin1.jsonl:2: not valid UTF-8"), ("data.csv", "unknown file type '.csv'"),
             ("bad.parquet", "not a readable parquet file")]
    for name, fragment in cases:
        with pytest.raises(DataError) as excinfo:
            reader(tmp_path / name)
        _check_one_line(excinfo, fragment)


# ----- encoding -----
@pytest.fixture(scope="module")
def tok():
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.chat import LLMLAB_CHAT_TOKENS

    texts = ["What is 2 + 2? 4. Sort 3 1 2 and reverse the word abc. " * 4]
    return Tokenizer.train(texts, vocab_size=280, special_tokens=["<|eos|>", *LLMLAB_CHAT_TOKENS],
                           progress=False, workers=1)


def test_encode_sft_masks_assistant_turns(tok):
    example = SFTExample([S, U, A])
    ids, mask = encode_sft(tok, example)
    assert (ids, mask) == tuple(tok.apply_chat_template([S, U, A]))
    kept = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(kept[:-1]) == "4" and kept[-1] == tok.chat_template.end_of_turn_id


def test_encode_sft_completion_only(tok):
    """An assistant turn inside a conversational prompt is context: only the completion carries loss."""
    example = SFTExample([U, A, U, B], train_from=3)
    ids, mask = encode_sft(tok, example)
    full_ids, full_mask = tok.apply_chat_template([U, A, U, B])
    assert ids == full_ids
    prefix = len(tok.apply_chat_template([U, A, U])[0])
    assert mask == [0] * prefix + full_mask[prefix:]
    assert sum(mask) == sum(full_mask) - sum(full_mask[:prefix]) > 0
    assert sum(full_mask[:prefix]) > 0  # the prompt's assistant turn was masked out, not absent


def test_encode_preference_splits_prompt_and_answers(tok):
    pair = PreferencePair([S, U], [A], [{"role": "assistant", "content": "five"}])
    prompt_ids, chosen_ids, rejected_ids = encode_preference(tok, pair)
    assert prompt_ids == tok.apply_chat_template([S, U], add_generation_prompt=True)[0]
    assert prompt_ids + chosen_ids == tok.apply_chat_template([S, U, A])[0]
    assert prompt_ids + rejected_ids == tok.apply_chat_template([S, U, pair.rejected[0]])[0]
    eot = tok.chat_template.end_of_turn_id
    assert chosen_ids[-1] == eot and rejected_ids[-1] == eot
    assert tok.decode(chosen_ids[:-1]) == "4" and tok.decode(rejected_ids[:-1]) == "five"


def test_read_then_encode_round_trip(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": [U, A], "rejected": [U, B]}])
    [pair] = read_preferences(path)
    prompt_ids, chosen_ids, _ = encode_preference(tok, pair)
    assert prompt_ids + chosen_ids == tok.apply_chat_template([U, A])[0]
