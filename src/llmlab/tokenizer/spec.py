"""What a tokenizer is made of, as plain data: the layer both the Tokenizer and its file formats build on.

`TokenizerSpec` holds the token table, merge rules, split pattern, special tokens, semantics,
`EncodingOptions` and the stored chat template (if any). The file formats read and write specs; the
Tokenizer is built from one and hands one out to be saved, so neither depends on the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.errors import TokenizerError
from llmlab.tokenizer.chat import ChatFormat

NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
SEMANTICS = ("merges", "ranks")
# Ids may skip unused values (tiktoken's cl100k leaves 100256 free before its specials), but a table that is
# mostly holes is a corrupt file, and allocating it could exhaust memory.
MAX_UNUSED_IDS = 1 << 16


@dataclass(frozen=True)
class EncodingOptions:
    """Hugging Face behaviours an imported tokenizer may carry (all off for llmlab's own tokenizers).

    prefix_space: ByteLevel add_prefix_space (a space is put before text that does not start with one);
    ignore_merges: a chunk that is itself a token is emitted whole; unk_id/fuse_unk: what a byte without a
    token becomes (HF drops it when there is no unk token); normalizer: a Unicode normal form applied first.
    """

    prefix_space: bool = False
    ignore_merges: bool = False
    unk_id: int | None = None
    fuse_unk: bool = False
    normalizer: str | None = None  # "NFC" | "NFD" | "NFKC" | "NFKD"

    def __post_init__(self):
        for name in ("prefix_space", "ignore_merges", "fuse_unk"):
            if not isinstance(getattr(self, name), bool):
                raise TokenizerError(f"option {name}={getattr(self, name)!r} must be true or false")
        if self.unk_id is not None and (isinstance(self.unk_id, bool) or not isinstance(self.unk_id, int)):
            raise TokenizerError(f"option unk_id={self.unk_id!r} must be a token id or null")
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise TokenizerError(f"option normalizer={self.normalizer!r} must be null or one of "
                                 f"{', '.join(NORMALIZERS)}")


@dataclass(frozen=True)
class TokenizerSpec:
    """tokens[id] is a regular token's bytes (None for special and unused ids); merges are (left id,
    right id) rules in priority order; pattern is the split regex (Python `regex` syntax); semantics is
    "merges" (merge-list BPE) or "ranks" (tiktoken's rank BPE with rank = id)."""

    tokens: list[bytes | None]
    merges: list[tuple[int, int]]
    pattern: str
    special_tokens: dict[str, int]
    semantics: str = "merges"
    options: EncodingOptions = field(default_factory=EncodingOptions)
    chat_format: ChatFormat | None = None  # the chat template (llmlab.tokenizer.chat), if one is stored

    @property
    def vocab_size(self) -> int:
        return max([len(self.tokens), *(i + 1 for i in self.special_tokens.values())])

    def token_bytes(self, token_id: int) -> bytes | None:
        """A regular token's bytes, a special token's UTF-8 text, or None for an unused id."""
        if token_id < len(self.tokens) and self.tokens[token_id] is not None:
            return self.tokens[token_id]
        return next((s.encode("utf-8") for s, i in self.special_tokens.items() if i == token_id), None)
