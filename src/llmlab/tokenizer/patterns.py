"""Pre-tokenization patterns: the regexes that cut text into chunks before BPE.

BPE merges never cross a chunk boundary, so the pattern decides what a token can be (a word with its
leading space, up to three digits, a run of punctuation, a run of whitespace...). Two patterns are built in:

- "gpt4": OpenAI's cl100k_base pattern (GPT-4), spelled exactly as tiktoken spells it, so llmlab's
  training chunks and tiktoken's encoding chunks come from the same expression. The default.
- "gpt2": OpenAI's r50k/GPT-2 pattern (tiktoken's optimised spelling; it splits text exactly as the
  classic `'s|'t|...|\\s+(?!\\S)|\\s+` that Hugging Face's ByteLevel pre-tokenizer uses).

Training splits text with Python's `regex` module and encoding with tiktoken's Rust engine. The two ship
different Unicode versions, so they can classify a recently assigned character differently (e.g. as a
letter or not); such text then forms different chunks in the two, which costs a little compression on it
and never correctness (encoding stays lossless and deterministic).

Any other string is taken as a custom regular expression (Python `regex` syntax, which tiktoken's Rust
engine also understands for the usual constructs). A bare word that is not a known name is an error rather
than a one-word regex, because a typo like "gtp4" would otherwise silently train a useless tokenizer.

Each built-in pattern also has
- an ASCII twin for Python's `re` module, used while *training* on pure-ASCII documents: it gives the same
  chunks (tests check this with hypothesis) about twice as fast as the `regex` module;
- a Hugging Face spelling for tokenizer.json: Oniguruma reads `\\p{N}{1,3}+` as "one or more groups of one
  to three digits" rather than a possessive repeat, so the export writes the plain `{1,3}`, which matches the
  same text here because nothing follows it inside its alternative.
"""

from __future__ import annotations

import difflib
import re

import regex

from llmlab.errors import TokenizerError

GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

PATTERNS: dict[str, str] = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}
# Other names people use for the same two patterns.
ALIASES: dict[str, str] = {"cl100k": "gpt4", "cl100k_base": "gpt4", "r50k": "gpt2", "r50k_base": "gpt2"}

# tiktoken's and the regex module's whitespace (\s = Unicode White_Space) restricted to ASCII. Python's
# `re` would also count \x1c-\x1f as whitespace, so the ASCII twins spell the class out.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_TWINS: dict[str, str] = {
    "gpt4": (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_WS}A-Za-z0-9]+[\r\n]*"""
             rf"""|[{_WS}]+\Z|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
    "gpt2": (rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"""
             rf"""|[{_WS}]+\Z|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
}
_HF_SPELLINGS: dict[str, str] = {
    "gpt4": GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}"),
    # HF's ByteLevel pre-tokenizer has GPT-2's pattern built in (use_regex=true); this is for Split.
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

# Patterns for which cutting text right after a "\n" that sits between two non-whitespace characters
# leaves every chunk unchanged. Why: no alternative of either pattern can match across such a newline (the
# newline is whitespace, its neighbours are not, and only whitespace runs or a trailing [\r\n]* contain
# newlines), and the single-newline run ends the same way with or without the text after it: gpt4's
# \s*[\r\n] (tried before the lookahead alternatives) and \s++$ both take exactly that newline, and
# gpt2's \s+(?!\S) then \s take it alone too. Training uses this to split huge documents into bounded
# pieces; tests check the counts are identical.
NEWLINE_CUT_SAFE = frozenset({"gpt4", "gpt2"})

_NAME_LIKE = re.compile(r"[A-Za-z0-9_\-]+")


def resolve_pattern(pattern: str) -> tuple[str, str | None]:
    """(regex, name) for a built-in name, an alias, or a custom regex (name None).

    Raises TokenizerError for an unknown name, an invalid regex, or one that matches the empty string
    (which would make tiktoken and the trainer loop on zero-length chunks).
    """
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"pattern must be a non-empty string, got {pattern!r}; "
                             f"use one of {', '.join(PATTERNS)} or a regular expression")
    name = ALIASES.get(pattern, pattern)
    if name in PATTERNS:
        return PATTERNS[name], name
    for known, text in PATTERNS.items():  # a saved tokenizer stores the regex itself; give it its name back
        if pattern == text:
            return text, known
    if _NAME_LIKE.fullmatch(pattern):
        close = difflib.get_close_matches(pattern, [*PATTERNS, *ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TokenizerError(f"unknown pattern name {pattern!r}{hint}; choose one of "
                             f"{', '.join(PATTERNS)} or pass a regular expression")
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise TokenizerError(f"pattern {pattern!r} is not a valid regular expression ({e}); "
                             f"fix it or use one of {', '.join(PATTERNS)}") from None
    if compiled.match("") is not None:
        raise TokenizerError(f"pattern {pattern!r} can match the empty string; make every alternative "
                             f"consume at least one character (e.g. use + instead of *)")
    return pattern, None


def pattern_name(pattern: str) -> str | None:
    """The built-in name of a resolved pattern (its regex text), or None for a custom one."""
    return next((name for name, text in PATTERNS.items() if text == pattern), None)


def compile_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def ascii_twin(name: str | None) -> re.Pattern | None:
    """A `re` pattern that splits pure-ASCII text exactly like the named pattern, or None."""
    return re.compile(_ASCII_TWINS[name]) if name in _ASCII_TWINS else None


def hf_spelling(pattern: str, name: str | None) -> str:
    """The pattern as written into a Hugging Face tokenizer.json (Oniguruma syntax)."""
    return _HF_SPELLINGS.get(name, pattern) if name else pattern


def from_hf_spelling(pattern: str) -> tuple[str, str | None]:
    """Map a pattern read from tokenizer.json back to a built-in one when it is a known spelling."""
    for name, text in _HF_SPELLINGS.items():
        if pattern == text:
            return PATTERNS[name], name
    return resolve_pattern(pattern)
