"""Is this the same tokenizer? Fingerprints and comparisons for artefacts that must agree.

A model only makes sense with the tokenizer it was trained on: a draft model, a distillation teacher, shards
and a checkpoint must all map every id to the same bytes. `fingerprint` is a short digest of what decoding
and encoding depend on (every token's bytes, the special tokens, the split pattern), recorded where an
artefact is written and compared where it is read.

Each artefact says what it knows of its tokenizer as a `TokenizerId`: a checkpoint records its tokenizer's
fingerprint in tokenizer_id.json beside config.json and carries a copy in tokenizer/; shards record it in
meta.json's tokenizer block (and may carry a copy); a tokenizer directory is its own evidence.
`require_same_tokenizer` compares two of them with the strongest evidence both have: fingerprints
(recorded, or computed from a copy), else the vocabulary sizes, where the other artefact's ids must fit the
model's vocabulary (a model's may be padded past its tokenizer's, as many Hugging Face models are).
`check_same_tokenizer` compares two saved tokenizers and names the first token that differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import CheckpointError, TokenizerError
from llmlab.tokenizer.core import Tokenizer

TOKENIZER_ID_FILE = "tokenizer_id.json"
_HEX16 = re.compile(r"[0-9a-f]{16}")


def fingerprint(tok: Tokenizer) -> str:
    """A 16-hex-digit digest of the tokenizer's id -> bytes map, special tokens and split pattern."""
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        piece = tok.token_bytes(i)
        h.update(len(piece).to_bytes(4, "little") + piece)
    h.update(json.dumps({"specials": tok.special_tokens, "pattern": tok.pattern}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def first_difference(ref: Tokenizer, other: Tokenizer, ref_role: str = "reference") -> str | None:
    """A phrase naming the first way `other` differs from `ref` (size, specials, one token), or None."""
    if ref.vocab_size != other.vocab_size:
        return f"{other.vocab_size} tokens vs the {ref_role}'s {ref.vocab_size}"
    if ref.special_tokens != other.special_tokens:
        return f"special tokens {other.special_tokens} vs the {ref_role}'s {ref.special_tokens}"
    diff = next((i for i in range(ref.vocab_size) if ref.token_bytes(i) != other.token_bytes(i)), None)
    if diff is not None:
        return f"token {diff} is {other.token_bytes(diff)!r} vs the {ref_role}'s {ref.token_bytes(diff)!r}"
    return None


def check_same_tokenizer(ref_dir: Path, other_dir: Path,
                         roles: tuple[str, str] = ("target", "draft")) -> None:
    """TokenizerError if both tokenizer directories exist and differ (size, special tokens or any id's bytes).

    Identical files are accepted without loading them. `roles` names the two artefacts in the message
    (a speculative target and its draft, shards and a model, training data and a teacher).
    """
    ref_dir, other_dir = Path(ref_dir), Path(other_dir)
    if not (ref_dir.is_dir() and other_dir.is_dir()) or _identical_copies(ref_dir, other_dir):
        return
    ref_role, other_role = roles
    problem = first_difference(Tokenizer.load(ref_dir), Tokenizer.load(other_dir), ref_role)
    if problem is not None:
        raise TokenizerError(f"the {other_role}'s tokenizer {other_dir} differs from the {ref_role}'s "
                             f"{ref_dir} "
                             f"({problem}); use a {other_role} that shares the {ref_role}'s tokenizer")


@dataclass(frozen=True)
class TokenizerId:
    """What an artefact knows of the tokenizer it was made with; `name` says which artefact in messages."""

    name: str
    vocab_size: int | None
    fingerprint: str | None = None
    directory: Path | None = None  # a saved copy of the tokenizer

    def resolved_fingerprint(self) -> str | None:
        if self.fingerprint is None and self.directory is not None:
            return fingerprint(Tokenizer.load(self.directory))
        return self.fingerprint


def write_tokenizer_id(checkpoint_dir: Path, tokenizer_fingerprint: str) -> None:
    """Record a tokenizer fingerprint in CHECKPOINT/tokenizer_id.json (inside the caller's atomic write)."""
    record = json.dumps({"fingerprint": tokenizer_fingerprint})
    (Path(checkpoint_dir) / TOKENIZER_ID_FILE).write_text(record + "\n")


def checkpoint_tokenizer(path: str | Path, vocab_size: int) -> TokenizerId:
    """A checkpoint's tokenizer: its recorded fingerprint, its tokenizer/ copy, the model's vocabulary."""
    path = Path(path)
    copy = path / "tokenizer"
    return TokenizerId(f"the model {path}", vocab_size, _recorded_fingerprint(path),
                       copy if copy.is_dir() else None)


def _recorded_fingerprint(path: Path) -> str | None:
    file = path / TOKENIZER_ID_FILE
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("fingerprint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file} is not a valid tokenizer record ({type(e).__name__}); delete it "
                              "(the checkpoint's tokenizer/ copy is used instead) or re-save the "
                              "checkpoint") from e
    if not isinstance(value, str) or not _HEX16.fullmatch(value):
        raise CheckpointError(f"{file} has fingerprint {value!r}, not 16 hex digits; delete it (the "
                              "checkpoint's tokenizer/ copy is used instead) or re-save the checkpoint")
    return value


def shards_tokenizer(shards: str | Path, meta: dict) -> TokenizerId:
    """The tokenizer of a shard directory, from its meta.json (as read by llmlab.data.shards.read_meta)."""
    block = meta["tokenizer"]
    copy = Path(shards) / block["copy"] if block.get("copy") else None
    return TokenizerId(f"the shards {shards}", int(block["vocab_size"]), block.get("fingerprint"),
                       copy if copy is not None and copy.is_dir() else None)


def directory_tokenizer(directory: str | Path, tok: Tokenizer | None = None) -> TokenizerId:
    """A saved tokenizer directory (pass `tok` if it is already loaded)."""
    tok = tok if tok is not None else Tokenizer.load(directory)
    return TokenizerId(f"the tokenizer {directory}", tok.vocab_size, fingerprint(tok), Path(directory))


def _identical_copies(a: Path | None, b: Path | None) -> bool:
    """Two tokenizer directories with the same files, byte for byte (no need to load either)."""
    if a is None or b is None:
        return False
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def require_same_tokenizer(model: TokenizerId, other: TokenizerId, fix: str) -> None:
    """TokenizerError (one line, ending with `fix`) unless `other` was made with `model`'s tokenizer."""
    if not (model.fingerprint and other.fingerprint) and _identical_copies(model.directory, other.directory):
        return
    ours, theirs = model.resolved_fingerprint(), other.resolved_fingerprint()
    if ours is not None and theirs is not None:
        if ours != theirs:
            raise TokenizerError(f"{other.name} uses a different tokenizer than {model.name} (fingerprint "
                                 f"{theirs} vs {ours}, {other.vocab_size} vs {model.vocab_size} tokens); "
                                 f"{fix}")
        return
    if model.vocab_size is not None and other.vocab_size is not None and other.vocab_size > model.vocab_size:
        raise TokenizerError(f"{other.name} has a {other.vocab_size}-token vocabulary but {model.name} has "
                             f"{model.vocab_size}; {fix}")
