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

Hugging Face `tokenizers` reads split regexes with Oniguruma (Ruby syntax), which spells a few things
differently from Python's `regex` (and tiktoken): `X{n,m}+` is one or more runs of X{n,m}, not a possessive
repeat; `^` and `$` are line anchors; `\\Z` also matches before a final newline; `\\h` is a hex digit;
the inline flag `m` means dot-matches-newline (Python's `s`). `from_oniguruma` and `to_oniguruma` rewrite
those constructs so a pattern means the same on both sides, and refuse what has no equivalent.
"""

from __future__ import annotations

import difflib
import functools
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
    if compiled.groups:
        raise TokenizerError(f"pattern {pattern!r} has a capturing group, which would make the split return "
                             f"the group instead of the whole match; write (?:...) instead of (...)")
    if compiled.match("") is not None:
        raise TokenizerError(f"pattern {pattern!r} can match the empty string; make every alternative "
                             f"consume at least one character (e.g. use + instead of *)")
    return pattern, None


@functools.lru_cache(maxsize=64)
def check_tiktoken_pattern(pattern: str) -> None:
    """TokenizerError unless tiktoken's regex engine compiles the pattern (encoding runs on tiktoken)."""
    import tiktoken

    try:
        tiktoken.Encoding(f"llmlab-check-{hash(pattern)}", pat_str=pattern,
                          mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    except ValueError as e:
        raise TokenizerError(f"pattern {pattern!r} does not compile in tiktoken's regex engine "
                             f"({str(e).splitlines()[0]}); rewrite it without that construct") from None


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
    return _HF_SPELLINGS[name] if name in _HF_SPELLINGS else to_oniguruma(pattern)


def from_hf_spelling(pattern: str) -> tuple[str, str | None]:
    """Map a pattern read from tokenizer.json back to a built-in one when it is a known spelling, else
    translate it from Oniguruma to Python `regex` syntax (see `from_oniguruma`)."""
    for name, text in _HF_SPELLINGS.items():
        if pattern == text:
            return PATTERNS[name], name
    return resolve_pattern(from_oniguruma(pattern))


# ---- Oniguruma (Hugging Face tokenizers) <-> Python regex --------------------------------------------------

_INTERVAL = re.compile(r"\{(?:\d+(?:,\d*)?|,\d+)\}\??")  # {n} {n,} {n,m} {,m}, optionally lazy
_FLAG_GROUP = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")
_GROUP_OPEN = re.compile(r"\((?:\?(?:[:=!>|]|<[=!]|P?<\w+>|'\w+'))?")
_SKIP_WHOLE = re.compile(r"\(\?(?:#|P=)[^)]*\)")  # comments and named backreferences
_BRACED_ESCAPE = re.compile(r"\\[pPxNuk]?[{<][^}>]*[}>]")
_LINE_END_PY = r"(?=\n|\z)"  # Oniguruma's $
_LINE_START_PY = r"(?:\A|(?<=\n))"  # Oniguruma's ^
_FINAL_END_PY = r"(?=\n?\z)"  # Oniguruma's \Z, and Python's $


def from_oniguruma(pattern: str) -> str:
    """A tokenizer.json split regex (Oniguruma) rewritten in Python `regex` syntax with the same meaning.

    `X{n,m}+` becomes `(?:X{n,m})+`, `$` `(?=\\n|\\z)`, `^` `(?:\\A|(?<=\\n))`, `\\Z` `(?=\\n?\\z)`, `\\h`
    `[0-9a-fA-F]` and the flag `m` becomes `s`; TokenizerError for what has no equivalent.
    """
    return _Translator(pattern, to_python=True).run()


def to_oniguruma(pattern: str) -> str:
    """A Python `regex` split pattern rewritten for tokenizer.json (Oniguruma) with the same meaning.

    A possessive `X{n,m}+` becomes the atomic group `(?>X{n,m})`, `$` `(?=\\n?\\z)`, `^` `\\A`, `\\Z`
    `\\z` and the flag `s` becomes `m`; TokenizerError for what has no equivalent.
    """
    return _Translator(pattern, to_python=False).run()


def _escape_end(text: str, i: int) -> int:
    """End of the escape starting at text[i] == "\\" (\\p{L}, \\x{41} and \\k<name> included)."""
    m = _BRACED_ESCAPE.match(text, i)
    return m.end() if m else min(i + 2, len(text))


class _Translator:
    """One pass over a pattern that keeps, per open group, the list of atoms written so far, so that a
    quantifier can be wrapped together with the atom it repeats."""

    def __init__(self, pattern: str, to_python: bool):
        self.pattern, self.to_python = pattern, to_python
        self.frames: list[list[str]] = [[]]

    def refuse(self, what: str) -> TokenizerError:
        side = "Hugging Face tokenizers (Oniguruma)" if self.to_python else "Python regex"
        other = "Python regex / tiktoken" if self.to_python else "Hugging Face tokenizers (Oniguruma)"
        return TokenizerError(f"pattern {self.pattern!r}: {what} in {side} has no equivalent in {other}; "
                              f"rewrite the pattern without it")

    def run(self) -> str:
        p, i = self.pattern, 0
        while i < len(p):
            i = self.step(i)
        while len(self.frames) > 1:  # an unclosed group: leave it for the regex compiler to report
            inner = self.frames.pop()
            self.frames[-1].extend(inner)
        return "".join(self.frames[0])

    def step(self, i: int) -> int:
        p, atoms = self.pattern, self.frames[-1]
        c = p[i]
        if c == "\\":
            end = _escape_end(self.pattern, i)
            atoms.append(self.escape(p[i:end]))
            return end
        if c == "[":
            end = self.class_end(i)
            atoms.append(self.char_class(p[i:end]))
            return end
        if c == "(":
            return self.open_group(i)
        if c == ")" and len(self.frames) > 1:
            group = "".join(self.frames.pop()) + ")"
            self.frames[-1].append(group)
            return i + 1
        if c == "{" and (m := _INTERVAL.match(p, i)) and atoms:
            return self.interval(m)
        if c in "*+?" and atoms:
            atoms[-1] += c
        elif c == "$":
            atoms.append(_LINE_END_PY if self.to_python else _FINAL_END_PY)
        elif c == "^":
            atoms.append(_LINE_START_PY if self.to_python else r"\A")
        else:
            atoms.append(c)
        return i + 1

    def interval(self, m: re.Match) -> int:
        """X{n,m}+ is one or more runs in Oniguruma and possessive in Python; other intervals agree."""
        atoms, end = self.frames[-1], m.end()
        if self.pattern[end:end + 1] != "+":
            atoms[-1] += m.group()
        elif self.to_python:
            atoms[-1] = f"(?:{atoms[-1]}{m.group()})"  # the "+" that follows repeats the group
        else:
            atoms[-1] = f"(?>{atoms[-1]}{m.group()})"
            end += 1
        return end

    def open_group(self, i: int) -> int:
        p = self.pattern
        if m := _SKIP_WHOLE.match(p, i):
            self.frames[-1].append(m.group())
            return m.end()
        if m := _FLAG_GROUP.match(p, i):
            opener = "(?" + self.flags(m.group(1)) + ("-" + self.flags(m.group(2)) if m.group(2) is not None
                                                      else "") + m.group(3)
            if m.group(3) == ")":  # (?i) sets flags for the rest of the group: not an atom to repeat
                self.frames[-1].append(opener)
            else:
                self.frames.append([opener])
            return m.end()
        m = _GROUP_OPEN.match(p, i)
        self.frames.append(["(?:" if m.group() == "(" else m.group()])  # chunks come from whole matches
        return m.end()

    def flags(self, letters: str) -> str:
        """Oniguruma's m is Python's s (dot matches newline); the other's spelling has no counterpart."""
        source, target = ("m", "s") if self.to_python else ("s", "m")
        if target in letters:
            raise self.refuse(f"the inline flag {target!r}")
        return letters.replace(source, target)

    def escape(self, text: str) -> str:
        if text in ("\\h", "\\H"):
            if not self.to_python:
                raise self.refuse(f"{text} (horizontal whitespace)")
            return "[0-9a-fA-F]" if text == "\\h" else "[^0-9a-fA-F]"
        if text == "\\Z":
            return _FINAL_END_PY if self.to_python else r"\z"
        return text

    def class_end(self, i: int) -> int:
        """End of the character class starting at i (Oniguruma nests classes; a leading ] is literal)."""
        p, j = self.pattern, i + 1
        j += p.startswith("^", j)
        j += p.startswith("]", j)
        depth = 1
        while j < len(p):
            if p[j] == "\\":
                j = _escape_end(self.pattern, j)
                continue
            depth += {"[": 1, "]": -1}.get(p[j], 0)
            j += 1
            if depth == 0:
                break
        return j

    def char_class(self, text: str) -> str:
        out, j = [], 0
        while j < len(text):
            if text[j] != "\\":
                out.append(text[j])
                j += 1
                continue
            end = _escape_end(text, j)
            esc = text[j:end]
            if esc in ("\\h", "\\H"):
                if not self.to_python or esc == "\\H":
                    raise self.refuse(f"{esc} inside a character class")
                esc = "0-9a-fA-F"
            out.append(esc)
            j = end
        return "".join(out)
