"""Is this the same tokenizer? Fingerprints and comparisons for artefacts that must agree.

A model only makes sense with the tokenizer it was trained on: a draft model, a distillation teacher, shards
and a checkpoint must all map every id to the same bytes. `fingerprint` is a short digest of what decoding
and encoding depend on (every token's bytes, the special tokens, the split pattern), recorded where an
artefact is written and compared where it is read; `check_same_tokenizer` compares two saved tokenizers and
names the first difference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmlab.errors import TokenizerError
from llmlab.tokenizer.core import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "llmlab.json")


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
    if not (ref_dir.is_dir() and other_dir.is_dir()):
        return
    if all((ref_dir / f).is_file() and (other_dir / f).is_file()
           and (ref_dir / f).read_bytes() == (other_dir / f).read_bytes() for f in TOKENIZER_FILES):
        return
    ref_role, other_role = roles
    problem = first_difference(Tokenizer.load(ref_dir), Tokenizer.load(other_dir), ref_role)
    if problem is not None:
        raise TokenizerError(f"the {other_role}'s tokenizer {other_dir} differs from the {ref_role}'s "
                             f"{ref_dir} "
                             f"({problem}); use a {other_role} that shares the {ref_role}'s tokenizer")
