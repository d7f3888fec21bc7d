"""The Tokenizer: byte-level BPE trained by llmlab, encoded by tiktoken, portable to HF and tiktoken formats.

A tokenizer is a table of token byte strings (id -> bytes), an ordered list of merge rules, a
pre-tokenization regex and a set of special tokens. Trained tokenizers use ids 0-255 for the bytes, 256 +
i for merge i, then the specials; imported ones keep the ids of the file they came from.

Encoding goes through a `tiktoken.Encoding` built from the merge ranks (byte b -> rank b, merge i -> rank
256 + i) whenever that is provably exact (see `reference.tiktoken_compatible`: always true for merge lists
made by training); ranks are mapped back to ids where the two differ. A merge list that fails the check
(possible for hand-edited or oddly built tokenizer.json files) is encoded by the pure-Python reference
encoder with a per-chunk cache instead: slower, but never a different answer from Hugging Face. The same
encoder takes text containing a byte that has no token (only imported tokenizers lack any), whose HF
handling (unk, or dropped with its neighbours then merging) tiktoken cannot express. Tokenizers imported
from .tiktoken files are defined by tiktoken's rank semantics and always use tiktoken.

Special tokens are never produced from ordinary text unless asked for (`allowed_special`); by default text
that contains one raises TokenizerError, as tiktoken does, so a document cannot smuggle in control tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import unicodedata
import warnings
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import regex

from llmlab.errors import TokenizerError
from llmlab.tokenizer import formats
from llmlab.tokenizer.chat import (
    ChatFormat,
    ChatTemplate,
    has_llmlab_tokens,
    hf_format,
    llmlab_format,
    resolve_format,
)
from llmlab.tokenizer.patterns import check_tiktoken_pattern, resolve_pattern
from llmlab.tokenizer.reference import merge_list_bpe, rank_bpe, tiktoken_compatible
from llmlab.tokenizer.spec import MAX_UNUSED_IDS, SEMANTICS, EncodingOptions, TokenizerSpec
from llmlab.tokenizer.train import count_chunks, learn_merges

DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Where a tokenizer (usually an imported one) lacks llmlab's names, these common spellings stand in.
_ROLE_NAMES = {
    "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"),
    "eos": ("<|eos|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "pad": ("<|pad|>", "<pad>", "<|padding|>"),
}


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with `Tokenizer.train`, `load`, `from_hf` or `from_tiktoken`."""

    def __init__(self, tokens: Sequence[bytes | None], merges: Sequence[tuple[int, int]], pattern: str,
                 special_tokens: dict[str, int] | None = None, *, semantics: str = "merges",
                 options: EncodingOptions | None = None, chat_format: ChatFormat | None = None):
        """tokens[id] is the byte string of a regular token (None for special ids and unused ids); merges are
        (left id, right id) rules in priority order; semantics "merges" (merge-list BPE, the default) or
        "ranks" (tiktoken's rank BPE with rank = id, for tokenizers read from .tiktoken files); chat_format
        the stored chat template (llmlab.tokenizer.chat)."""
        self._pattern, self._pattern_name = resolve_pattern(pattern)
        if self._pattern_name is None:
            check_tiktoken_pattern(self._pattern)
        self._tokens: list[bytes | None] = list(tokens)
        self._merges: list[tuple[int, int]] = [_merge_pair(k, m) for k, m in enumerate(merges)]
        self._special: dict[str, int] = dict(special_tokens or {})
        if semantics not in SEMANTICS:
            raise TokenizerError(f"semantics must be 'merges' or 'ranks', not {semantics!r}")
        self._semantics = semantics
        self._options = options or EncodingOptions()
        if not isinstance(self._options, EncodingOptions):
            raise TokenizerError(f"options must be an EncodingOptions, not {type(self._options).__name__}")
        if chat_format is not None and not isinstance(chat_format, ChatFormat):
            raise TokenizerError(f"chat_format must be a ChatFormat, not {type(chat_format).__name__}")
        self._chat_format = chat_format
        self._validate()
        self._reset_caches()
        if chat_format is not None:
            self.chat_template  # noqa: B018 -- refuse a template whose tokens this tokenizer lacks, now

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, pattern: str = "gpt4",
              special_tokens: Sequence[str] | None = None, max_chars: int | None = None,
              progress: bool = True, workers: int | None = None) -> Tokenizer:
        """Learn byte-level BPE merges from `texts` (an iterable of documents).

        vocab_size counts the 256 bytes, the merges and the special tokens (default DEFAULT_SPECIAL_TOKENS,
        appended after the merges; pass [] for none). pattern: "gpt4" (default), "gpt2" or a regex.
        max_chars caps the characters read. Chunk counting uses `workers` processes (None: all CPUs).
        Each step merges the most frequent adjacent pair; ties go to the smallest (left id, right id).
        If the corpus runs out of pairs first, the vocabulary is smaller than asked (a warning says so).
        """
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("Tokenizer.train expects an iterable of documents, got a single "
                                 f"{type(texts).__name__}; wrap it in a list: Tokenizer.train([text], ...)")
        specials = _check_specials(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        regex_text, name = resolve_pattern(pattern)
        if name is None:
            check_tiktoken_pattern(regex_text)
        if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                or vocab_size < 256 + len(specials)):
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is below 256 byte tokens + {len(specials)} special tokens = "
                f"{256 + len(specials)}; pass vocab_size >= {256 + len(specials)}")
        if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
            raise TokenizerError(f"max_chars={max_chars!r} must be a positive integer (or None for no cap)")
        counts = count_chunks(texts, regex_text, name, max_chars=max_chars, workers=workers,
                              progress=progress)
        if not counts:
            raise TokenizerError("the training corpus is empty (no text after reading every document); "
                                 "pass files or strings that contain text")
        n_merges = vocab_size - 256 - len(specials)
        merges = learn_merges(counts, n_merges, progress=progress)
        if len(merges) < n_merges:
            warnings.warn(f"the corpus only supports {len(merges)} merges, so the vocabulary has "
                          f"{256 + len(merges) + len(specials)} tokens instead of {vocab_size}; "
                          f"train on more text for a larger vocabulary", stacklevel=2)
        tokens: list[bytes | None] = [bytes([i]) for i in range(256)]
        for a, b in merges:
            tokens.append(tokens[a] + tokens[b])
        special_ids = {s: len(tokens) + i for i, s in enumerate(specials)}
        tokens += [None] * len(specials)
        chat = llmlab_format(special_ids) if has_llmlab_tokens(special_ids) else None
        return cls(tokens, merges, regex_text, special_ids, chat_format=chat)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved with `save` (reads DIR/llmlab.json)."""
        directory = Path(directory)
        return cls._from_spec(formats.read_llmlab_dir(directory), directory / formats.LLMLAB_JSON)

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> Tokenizer:
        """Import a Hugging Face tokenizer.json (byte-level BPE); a directory holding one also works.

        The model's Jinja chat template (chat_template.jinja or tokenizer_config.json beside the file) comes
        along; one whose end of turn cannot be found is dropped with a warning."""
        path = formats.hf_json_path(Path(path))
        spec = formats.read_hf(path)
        template, variables = formats.read_hf_chat(path.parent)
        if template is not None:
            try:
                chat = hf_format(template, variables, spec.special_tokens)
                spec = dataclasses.replace(spec, chat_format=chat)
            except TokenizerError as e:
                warnings.warn(f"{path.parent}: the chat template is not kept ({e})", stacklevel=2)
        return cls._from_spec(spec, path)

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str = "gpt4",
                      specials: dict[str, int] | Sequence[str] | None = None) -> Tokenizer:
        """Import a .tiktoken rank file ("<base64 token> <rank>" per line); ids are the ranks.

        specials: {token: id}, or a list of tokens given ids after the largest rank.
        """
        return cls._from_spec(formats.read_tiktoken(Path(path), pattern, specials), path)

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        """A tokenizer from plain data (the inverse of `spec`)."""
        return cls(spec.tokens, spec.merges, spec.pattern, spec.special_tokens, semantics=spec.semantics,
                   options=spec.options, chat_format=spec.chat_format)

    @classmethod
    def _from_spec(cls, spec: TokenizerSpec, source: str | os.PathLike) -> Tokenizer:
        """A tokenizer from a spec read from `source`, whose name prefixes any error."""
        try:
            return cls.from_spec(spec)
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None

    def spec(self) -> TokenizerSpec:
        """The tokenizer as plain data (what the file formats write)."""
        return TokenizerSpec(list(self._tokens), list(self._merges), self._pattern, dict(self._special),
                             semantics=self._semantics, options=self._options, chat_format=self._chat_format)

    def save(self, directory: str | os.PathLike) -> None:
        """Write DIR/llmlab.json (llmlab's versioned format) and DIR/tokenizer.json (Hugging Face),
        atomically."""
        formats.write_llmlab_dir(self.spec(), Path(directory))

    def to_hf(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer.json that `tokenizers.Tokenizer.from_file` encodes identically."""
        formats.write_hf(self.spec(), Path(path))

    # ---- properties ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1), special tokens included."""
        return len(self._table)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def bos_id(self) -> int | None:
        return self._role("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role("pad")

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def pattern_name(self) -> str | None:
        return self._pattern_name

    @property
    def merges(self) -> list[tuple[int, int]]:
        return list(self._merges)

    @property
    def semantics(self) -> str:
        return self._semantics

    @property
    def options(self) -> EncodingOptions:
        return self._options

    @property
    def chat_format(self) -> ChatFormat | None:
        """The stored chat template as plain data (None: none stored)."""
        return self._chat_format

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template bound to this tokenizer's ids: the stored one, else llmlab's when the tokenizer
        has llmlab's chat tokens; TokenizerError otherwise (llmlab.tokenizer.chat.with_chat_tokens adds
        them)."""
        if self._chat is None:
            fmt = resolve_format(self._chat_format, self._special)
            if fmt is None:
                raise TokenizerError("this tokenizer has no chat template and lacks llmlab's chat tokens; "
                                     "add them with llmlab.tokenizer.chat.with_chat_tokens (fine-tuning "
                                     "does it)")
            self._chat = ChatTemplate(fmt, self._special)
        return self._chat

    def apply_chat_template(self, messages,
                            add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation [{"role": "system"|"user"|"assistant", "content": str}, ...].

        loss_mask is 1 on assistant tokens, each turn's end-of-turn token included, 0 elsewhere. With
        add_generation_prompt the ids end with the assistant header, ready for generation. The ids equal
        transformers' apply_chat_template for the same template (see llmlab.tokenizer.chat).
        """
        return self.chat_template.apply(self, messages, add_generation_prompt)

    @property
    def uses_tiktoken(self) -> bool:
        """Whether encoding runs on tiktoken (True unless the merge list failed the exactness check)."""
        return self._fast() is not None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8 text for special ids)."""
        self._check_ids([token_id])
        return self._table[token_id]

    def __repr__(self) -> str:
        name = self._pattern_name or "custom"
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, pattern={name}, "
                f"specials={len(self._special)})")

    # ---- encoding -----------------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: str | Collection[str] = "none_raise",
               disallowed_special: str | Collection[str] = "all") -> list[int]:
        """Token ids of `text`.

        allowed_special: "none_raise" (default: no special tokens; text containing one raises),
        "none" (special-token text is encoded as ordinary text), "all", or a set of special tokens to
        recognise. disallowed_special ("all" = every special not allowed, or a collection) names the special
        tokens whose presence raises TokenizerError; pass () to encode them as ordinary text (tiktoken's API).
        """
        allowed = self._specials_allowed(text, allowed_special, disallowed_special)
        return self._encode(text, allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token text as ordinary text."""
        return self._encode(_check_text(text), frozenset())

    def encode_batch(self, texts: Sequence[str], allowed_special: str | Collection[str] = "none_raise",
                     disallowed_special: str | Collection[str] = "all",
                     num_threads: int = 8) -> list[list[int]]:
        """encode() of each text, on `num_threads` threads (tiktoken releases the GIL while encoding)."""
        texts = list(texts)
        encode = functools.partial(self.encode, allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        if len(texts) <= 1 or num_threads <= 1:
            return [encode(t) for t in texts]
        self._fast()  # build the tiktoken encoding once, before the threads start
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(encode, texts))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of a token sequence (special tokens as their UTF-8 text)."""
        ids = _as_list(ids)
        table = self._table
        try:
            if ids and min(ids) < 0:  # a negative index would silently wrap around
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            self._check_ids(ids)  # raises the precise TokenizerError
            raise

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of a token sequence; bytes that are not valid UTF-8 become U+FFFD (errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- internals ----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        n = len(self._tokens)
        for i, t in enumerate(self._tokens):
            if t is not None and (not isinstance(t, bytes) or not t):
                raise TokenizerError(f"token {i} is {t!r}; a regular token is a non-empty byte string")
        for s, i in self._special.items():
            if not isinstance(s, str) or not s:
                raise TokenizerError(f"special token {s!r} must be a non-empty string")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n + MAX_UNUSED_IDS:
                raise TokenizerError(f"special token {s!r} has invalid id {i!r} (ids are 0 to "
                                     f"{n + MAX_UNUSED_IDS - 1} for {n} regular ids)")
            if i < n and self._tokens[i] is not None:
                raise TokenizerError(f"special token {s!r} reuses id {i} of the regular token "
                                     f"{self._tokens[i]!r}")
        if len(set(self._special.values())) != len(self._special):
            raise TokenizerError("two special tokens share one id; give each its own id")
        width = max([n, *(i + 1 for i in self._special.values())])
        table: list[bytes | None] = self._tokens + [None] * (width - n)
        for s, i in self._special.items():
            table[i] = s.encode("utf-8")
        self._table = table
        self._all_specials = frozenset(self._special)
        self._special_prefixes = frozenset(name[:2] for name in self._special)
        self._bytes_to_id: dict[bytes, int] = {}
        for i, t in enumerate(self._tokens):
            if t is not None:
                if t in self._bytes_to_id:
                    raise TokenizerError(f"tokens {self._bytes_to_id[t]} and {i} are both {t!r}; "
                                         f"each byte string may appear once")
                self._bytes_to_id[t] = i
        self._byte_ids: list[int | None] = [self._bytes_to_id.get(bytes([b])) for b in range(256)]
        merged = []
        for k, (a, b) in enumerate(self._merges):
            if not (0 <= a < n and 0 <= b < n) or self._tokens[a] is None or self._tokens[b] is None:
                raise TokenizerError(f"merge #{k} ({a}, {b}) refers to an id that is not a regular token")
            result = self._bytes_to_id.get(self._tokens[a] + self._tokens[b])
            if result is None:
                raise TokenizerError(f"merge #{k} ({self._tokens[a]!r} + {self._tokens[b]!r}) makes a token "
                                     f"that is not in the vocabulary; the tokenizer file is inconsistent")
            merged.append(result)
        self._merged_ids = merged
        unk = self._options.unk_id
        if unk is not None and not (0 <= unk < width and table[unk] is not None):
            raise TokenizerError(f"unk id {unk} is not a token of this tokenizer (ids 0..{width - 1})")

    def _reset_caches(self) -> None:
        self._fast_state = None  # (tiktoken.Encoding, rank_to_id list or None) | False once known unusable
        self._why_not_fast: str | None = None
        self._present_bytes: bytes | None = None  # set when some bytes have no token (imports only)
        self._piece_cache: dict[str, list[int]] = {}
        self._special_res: dict[frozenset, regex.Pattern] = {}
        self._split_re: regex.Pattern | None = None
        self._merge_rank_map: dict | None = None
        self._chat: ChatTemplate | None = None

    _CACHES = ("_fast_state", "_why_not_fast", "_present_bytes", "_piece_cache", "_special_res", "_split_re",
               "_merge_rank_map", "_chat")

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in self._CACHES:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_caches()

    def _role(self, role: str) -> int | None:
        for name in _ROLE_NAMES[role]:
            if name in self._special:
                return self._special[name]
        return None

    def _specials_allowed(self, text, allowed_special, disallowed_special) -> frozenset:
        """The special tokens to recognise in `text`, after raising for any disallowed one it contains."""
        _check_text(text)
        if allowed_special == "none_raise" and disallowed_special == "all":  # the default, kept cheap
            specials = self._special_re(self._all_specials)
            if self._may_hold_special(text) and specials.search(text, concurrent=True):
                self._raise_special(text, self._all_specials)
            return frozenset()
        if allowed_special == "none":
            return frozenset()
        if allowed_special == "all":
            allowed = frozenset(self._special)
        elif allowed_special == "none_raise":
            allowed = frozenset()
        elif isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special={allowed_special!r}; use 'none_raise', 'none', 'all' "
                                 f"or a set of special tokens")
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self._special.keys()
            if unknown:
                raise TokenizerError(f"allowed_special names unknown special tokens {sorted(unknown)}; "
                                     f"this tokenizer has {sorted(self._special)}")
        if disallowed_special == "all":
            disallowed = frozenset(self._special) - allowed
        else:
            disallowed = frozenset(disallowed_special) - allowed
        if (disallowed and self._may_hold_special(text)
                and self._special_re(disallowed).search(text, concurrent=True)):
            self._raise_special(text, disallowed)
        if allowed and (not self._may_hold_special(text)
                        or self._special_re(allowed).search(text, concurrent=True) is None):
            return frozenset()  # nothing to split on: take the plain path
        return allowed

    def _may_hold_special(self, text: str) -> bool:
        """False when no special token can occur in text: a substring test per distinct two-character
        prefix ("<|" for all the defaults) runs at memchr speed, far faster than a regex search."""
        return any(prefix in text for prefix in self._special_prefixes)

    def _raise_special(self, text: str, disallowed: frozenset):
        found = self._special_re(disallowed).search(text)
        raise TokenizerError(
            f"the text contains the special token {found.group()!r} (at character {found.start()}); "
            f"pass allowed_special={{{found.group()!r}}} or 'all' to encode it as a special token "
            f"(CLI: --allow-special), or allowed_special='none' to encode it as ordinary text")

    def _special_re(self, names: frozenset) -> regex.Pattern:
        pat = self._special_res.get(names)
        if pat is None:
            # Longest first, so "<|end|>" cannot shadow a longer token that starts the same way.
            pat = regex.compile("|".join(regex.escape(s) for s in sorted(names, key=len, reverse=True)))
            self._special_res[names] = pat
        return pat

    def _encode(self, text: str, allowed: frozenset) -> list[int]:
        fast = self._fast()
        plain = self._options.normalizer is None and not self._options.prefix_space
        if fast is not None and plain and self._covered(text):
            enc, rank_to_id = fast
            ranks = enc.encode(text, allowed_special=allowed, disallowed_special=()) if allowed else \
                enc.encode_ordinary(text)
            return ranks if rank_to_id is None else [rank_to_id[r] for r in ranks]
        if not allowed:
            return self._encode_segment(text)
        out: list[int] = []
        start = 0
        for m in self._special_re(allowed).finditer(text):
            out += self._encode_segment(text[start:m.start()])
            out.append(self._special[m.group()])
            start = m.end()
        out += self._encode_segment(text[start:])
        return out

    def _encode_segment(self, text: str) -> list[int]:
        """Ordinary text between special tokens: normalise, add the prefix space, then BPE."""
        if not text:
            return []
        opts = self._options
        if opts.normalizer:
            text = unicodedata.normalize(opts.normalizer, text)
        if opts.prefix_space and not text.startswith(" "):
            text = " " + text
        fast = self._fast()
        if fast is not None and self._covered(text):
            enc, rank_to_id = fast
            ranks = enc.encode_ordinary(text)
            return ranks if rank_to_id is None else [rank_to_id[r] for r in ranks]
        return self._encode_exact(text)

    def _covered(self, text: str) -> bool:
        """Whether every byte of text has a token. Only tokenizers imported without the full byte alphabet
        can fail this; their texts with such bytes go to the exact encoder, which reproduces HF's handling
        (unk or dropped, with the neighbours of a dropped byte becoming adjacent)."""
        return self._present_bytes is None or not _utf8(text).translate(None, self._present_bytes)

    def _encode_exact(self, text: str) -> list[int]:
        """The reference encoder over regex chunks, memoised per chunk (real text repeats chunks a lot)."""
        cache = self._piece_cache
        out: list[int] = []
        for piece in self._splitter().findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
                if len(cache) < 1 << 20:
                    cache[piece] = ids
            out += ids
        return out

    def _splitter(self) -> regex.Pattern:
        if self._split_re is None:
            self._split_re = regex.compile(self._pattern)
        return self._split_re

    def _encode_piece(self, piece: str) -> list[int]:
        data = _utf8(piece)
        if self._semantics == "ranks":
            return rank_bpe(data, self._bytes_to_id)
        opts = self._options
        if opts.ignore_merges and data in self._bytes_to_id:
            return [self._bytes_to_id[data]]
        symbols: list[int] = []
        for byte in data:  # HF: a byte without a token becomes unk (fused if asked) or is dropped
            sid = self._byte_ids[byte]
            if sid is None:
                if opts.unk_id is None or (opts.fuse_unk and symbols and symbols[-1] == opts.unk_id):
                    continue
                sid = opts.unk_id
            symbols.append(sid)
        return merge_list_bpe(symbols, self._merge_rank())

    def _merge_rank(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(left, right) -> (priority, merged id) for the reference encoder; a repeated rule keeps its
        first."""
        if self._merge_rank_map is None:
            rank: dict[tuple[int, int], tuple[int, int]] = {}
            for i, pair in enumerate(self._merges):
                rank.setdefault(pair, (i, self._merged_ids[i]))
            self._merge_rank_map = rank
        return self._merge_rank_map

    def _fast(self):
        """(tiktoken.Encoding, rank_to_id or None) when tiktoken encodes exactly like this tokenizer, else
        None."""
        if self._fast_state is None:
            self._fast_state = self._build_fast() or False
        return self._fast_state or None

    def _build_fast(self):
        import tiktoken

        if self._semantics == "ranks":
            ranks = dict(self._bytes_to_id)
            specials = dict(self._special)
            rank_to_id = None
        else:
            why = tiktoken_compatible(self._tokens, self._merges, self._merged_ids, self._byte_ids,
                                      require_all_bytes=False)
            if why is None and self._options.ignore_merges:
                reachable = len(self._merges) + 256
                if len(self._bytes_to_id) != reachable:
                    why = "ignore_merges is set and some tokens are not built by any merge"
            if why is None and self._options.unk_id is not None and self._options.unk_id in self._merged_ids:
                why = "the unk token is also built by a merge"
            if why is not None:
                self._why_not_fast = why
                return None
            # Bytes without a token still get a rank (tiktoken needs one for every byte), but texts holding
            # them never reach tiktoken (see _covered), so those ranks are never produced.
            ranks = {bytes([b]): b for b in range(256)}
            for i, t in enumerate(self._merged_ids):
                ranks[self._tokens[t]] = 256 + i
            top = 256 + len(self._merges)
            specials = {s: top + k for k, s in enumerate(self._special)}
            rank_to_id = [*self._byte_ids, *self._merged_ids, *self._special.values()]
            if rank_to_id == list(range(len(rank_to_id))):
                rank_to_id = None
            present = bytes(b for b in range(256) if self._byte_ids[b] is not None)
            self._present_bytes = present if len(present) < 256 else None
        try:
            enc = tiktoken.Encoding(f"llmlab-{id(self)}", pat_str=self._pattern, mergeable_ranks=ranks,
                                    special_tokens=specials)
        except ValueError as e:  # tiktoken's regex engine rejected the pattern
            raise TokenizerError(f"tiktoken cannot compile the pattern {self._pattern!r} ({e}); "
                                 f"use a pattern without that construct") from None
        return enc, rank_to_id

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = len(self._table)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TokenizerError(f"token id {i!r} is not an integer; pass a sequence of ints")
            if not 0 <= i < n or self._table[i] is None:
                raise TokenizerError(f"token id {i} is not in this tokenizer (ids 0..{n - 1}); "
                                     f"decode ids produced by the same tokenizer")


def _merge_pair(k: int, merge) -> tuple[int, int]:
    if (not isinstance(merge, (tuple, list)) or len(merge) != 2
            or any(isinstance(i, bool) or not isinstance(i, int) for i in merge)):
        raise TokenizerError(f"merge #{k} is {merge!r}; a merge is a pair of token ids")
    return merge[0], merge[1]


def _check_specials(specials: Sequence[str]) -> list[str]:
    if isinstance(specials, str):
        raise TokenizerError(f"special_tokens must be a list of strings, not the string {specials!r}")
    out = list(specials)
    for s in out:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"special token {s!r} must be a non-empty string")
    dup = {s for s in out if out.count(s) > 1}
    if dup:
        raise TokenizerError(f"special tokens {sorted(dup)} are listed twice; list each once")
    return out


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode expects a str, got {type(text).__name__}; decode bytes to text first")
    return text


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates become U+FFFD, as in tiktoken
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")


def _as_list(ids) -> list:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    return ids if isinstance(ids, list) else list(ids)
