"""Chat and preference data in the formats TRL takes, read from JSONL or Parquet and encoded with a chat
template.

    from llmlab.data.chat_data import read_sft, read_preferences, encode_sft, encode_preference
    examples = read_sft("sft.jsonl")                     # list[SFTExample]
    ids, loss_mask = encode_sft(tok, examples[0])        # via tok.apply_chat_template
    pairs = read_preferences("prefs.parquet")            # list[PreferencePair]
    prompt_ids, chosen_ids, rejected_ids = encode_preference(tok, pairs[0])

SFT records (one JSON object per line, or one Parquet row):
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}                      # text: a user turn and an assistant turn
    {"prompt": [messages...], "completion": [messages...]}      # conversational prompt/completion
Loss falls on assistant turns; with prompt/completion only on the completion's assistant turns (an
assistant turn inside a conversational prompt is context, as TRL's completion-only loss treats it).

Preference records:
    {"prompt": "...", "chosen": "...", "rejected": "..."}       # strings: a user turn, then assistant turns
    {"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}
    {"chosen": [messages...], "rejected": [messages...]}        # implicit prompt: the messages chosen and
                                                                # rejected share from the start
Roles are system, user and assistant; other keys of a record or a message are ignored (datasets often carry
ids and scores). A malformed record raises DataError naming file, line (Parquet: row) and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class SFTExample:
    """A conversation; assistant turns from message `train_from` on carry the loss, earlier ones are context.
    `where` names the record (FILE:LINE) for later error messages."""

    messages: list[Message]
    train_from: int = 0
    where: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages) and two continuations of it (messages, normally one assistant turn each)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    where: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # the record's other keys (task, rater, ...)


# ----- reading records -----
def iter_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a .jsonl or .parquet file; where is "FILE:LINE" / "FILE:row N"."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass an existing .jsonl or .parquet file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_records(path)
    elif suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; use .jsonl (one JSON object per "
                        "line) or .parquet")


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or delete "
                                "that line (each line must be one JSON object)") from None
            yield f"{path}:{lineno}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed; run `pip install pyarrow`"
                        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for bytes that are not Parquet
        raise DataError(f"{path} is not a readable parquet file ({e}); re-export it") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1  # a null cell is an absent field (a column that only some records fill)
            yield f"{path}:row {row}", {k: v for k, v in record.items() if v is not None}


def _read(path: str | Path, parse, what: str, example: str) -> list:
    items = []
    for where, record in iter_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object like {example}, got {type(record).__name__}; "
                            "fix that record")
        items.append(parse(record, where))
    if not items:
        raise DataError(f"{path} holds no {what} records; add records like {example}")
    return items


# ----- validating messages -----
def _messages(value, where: str, name: str) -> list[Message]:
    """A list of {"role", "content"} dicts, checked; `name` is the field for the error message."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name} is {type(value).__name__}, not a list of messages; fix that "
                        'record (messages look like [{"role": "user", "content": "..."}])')
    if not value:
        raise DataError(f"{where}: field {name} is an empty list; give at least one message or drop the "
                        "record")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {name}[{i}] is {type(m).__name__}, not a message object; fix "
                            'that record (a message is {"role": "user", "content": "..."})')
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {name}[{i}] has no {key!r} (keys: "
                                f"{', '.join(sorted(m)) or 'none'}); add it to that message")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field {name}[{i}].role is {m['role']!r}; use one of "
                            f"{', '.join(ROLES)} (fix that message)")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: field {name}[{i}].content is {type(m['content']).__name__}, not a "
                            "string; fix that message")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} is {type(value).__name__}; give a string or, in "
                        "conversational records, a list of messages (fix that record)")
    return value


def _require_assistant(messages: list[Message], where: str, name: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {name} has no assistant message, so nothing to learn; add one or "
                        "drop the record")


def _missing(record: dict, where: str, wanted: str) -> DataError:
    keys = ", ".join(sorted(map(str, record))[:8]) or "none"
    return DataError(f"{where}: no field {wanted} (keys: {keys}); give the record in one of the formats of "
                     "llmlab.data.chat_data")


def _both_kinds(record: dict, fields: tuple[str, ...], where: str) -> bool:
    """True if the fields are all lists (conversational), False if all strings; DataError if mixed."""
    kinds = {f: isinstance(record[f], list) for f in fields}
    if len(set(kinds.values())) > 1:
        lists = [f for f, is_list in kinds.items() if is_list]
        other = [f for f, is_list in kinds.items() if not is_list][0]
        raise DataError(f"{where}: field {other} is {type(record[other]).__name__} while "
                        f"{', '.join(lists)} {'is' if len(lists) == 1 else 'are'} a message list; give all "
                        "as strings or all as message lists")
    return next(iter(kinds.values()))


# ----- SFT -----
def parse_sft(record: dict, where: str = "record") -> SFTExample:
    """One SFT record (see the module docstring) as an SFTExample; DataError naming `where` and the field."""
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        _require_assistant(messages, where, "messages")
        return SFTExample(messages, 0, where)
    if "prompt" not in record or "completion" not in record:
        hint = "messages (or prompt and completion)"
        if "chosen" in record:
            hint += "; this looks like preference data, read it with read_preferences"
        elif "text" in record:
            hint += "; plain text is pretraining data (llmlab data prepare)"
        raise _missing(record, where, hint)
    if _both_kinds(record, ("prompt", "completion"), where):
        prompt = _messages(record["prompt"], where, "prompt")
        completion = _messages(record["completion"], where, "completion")
        _require_assistant(completion, where, "completion")
        return SFTExample(prompt + completion, len(prompt), where)
    prompt = _text(record["prompt"], where, "prompt")
    completion = _text(record["completion"], where, "completion")
    return SFTExample([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                      1, where)


def read_sft(path: str | Path) -> list[SFTExample]:
    """Every record of a .jsonl or .parquet SFT file; DataError "FILE:LINE: field ..." for a bad record."""
    return _read(path, parse_sft, "SFT", '{"messages": [{"role": "user", "content": "..."}, ...]}')


# ----- preferences -----
def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_prompt(chosen: list[Message], rejected: list[Message], where: str
                  ) -> tuple[list[Message], list[Message], list[Message]]:
    """Implicit prompt: the messages chosen and rejected share from the start."""
    n = _common_prefix(chosen, rejected)
    if n == 0:
        raise DataError(f"{where}: no field prompt, and chosen and rejected share no leading messages to "
                        "take as the prompt; add a prompt field")
    if n == len(chosen) or n == len(rejected):
        same = "chosen" if n == len(chosen) else "rejected"
        raise DataError(f"{where}: field {same} is all prompt (every message of it is shared with the other "
                        "answer), so it has no answer of its own; fix that record")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_preference(record: dict, where: str = "record") -> PreferencePair:
    """One preference record (see the module docstring) as a PreferencePair; DataError naming the field."""
    for name in ("chosen", "rejected"):
        if name not in record:
            raise _missing(record, where, name)
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    fields = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    if not _both_kinds(record, fields, where):
        if "prompt" not in record:
            raise DataError(f"{where}: no field prompt; string chosen/rejected need a string prompt (only "
                            "message lists can share an implicit prompt)")
        prompt, chosen, rejected = (_text(record[f], where, f) for f in fields)
        return PreferencePair([{"role": "user", "content": prompt}],
                              [{"role": "assistant", "content": chosen}],
                              [{"role": "assistant", "content": rejected}], where, extra)
    chosen = _messages(record["chosen"], where, "chosen")
    rejected = _messages(record["rejected"], where, "rejected")
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt")
        k = len(prompt)
        if chosen[:k] == prompt and rejected[:k] == prompt and len(chosen) > k and len(rejected) > k:
            chosen, rejected = chosen[k:], rejected[k:]  # whole conversations that repeat the prompt
    else:
        prompt, chosen, rejected = _split_prompt(chosen, rejected, where)
    _require_assistant(chosen, where, "chosen")
    _require_assistant(rejected, where, "rejected")
    return PreferencePair(prompt, chosen, rejected, where, extra)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every record of a .jsonl or .parquet preference file; DataError "FILE:LINE: field ..." if malformed."""
    return _read(path, parse_preference, "preference",
                 '{"prompt": "...", "chosen": "...", "rejected": "..."}')


# ----- encoding with a chat template -----
def encode_sft(tok, example: SFTExample) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of the conversation: the mask is 1 on assistant tokens (end-of-turn included) from
    message `train_from` on, 0 elsewhere."""
    ids, mask = tok.apply_chat_template(example.messages)
    if example.train_from and any(m["role"] == "assistant" for m in example.messages[:example.train_from]):
        context = _prefix_ids(tok, example.messages[:example.train_from], ids, example.where)
        mask = [0] * len(context) + list(mask[len(context):])
    return list(ids), list(mask)


def encode_preference(tok, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids): the prompt rendered up to and including the assistant header,
    each answer the tokens that follow it (end-of-turn included), so prompt_ids + chosen_ids is the whole
    rendered conversation."""
    prompt_ids, _ = tok.apply_chat_template(pair.prompt, add_generation_prompt=True)
    answers = []
    for answer in (pair.chosen, pair.rejected):
        ids, _ = tok.apply_chat_template(pair.prompt + answer)
        _prefix_ids(tok, pair.prompt, ids, pair.where, prompt_ids)
        answers.append(list(ids[len(prompt_ids):]))
    return list(prompt_ids), answers[0], answers[1]


def _prefix_ids(tok, prompt: list[Message], full: list[int], where: str, prefix=None) -> list[int]:
    """The ids of `prompt` rendered alone, checked to open `full` (a template that renders a conversation's
    start differently from the conversation cannot split prompt from answer)."""
    if prefix is None:
        prefix, _ = tok.apply_chat_template(prompt)
    if list(full[:len(prefix)]) != list(prefix):
        raise DataError(f"{where or 'a record'}: the chat template renders the prompt differently alone than "
                        "inside the whole conversation, so prompt and answer cannot be split; use a "
                        "template whose rendering of a conversation starts with that of its prompt")
    return list(prefix)
