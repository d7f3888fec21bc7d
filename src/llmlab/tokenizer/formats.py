"""Tokenizer file formats: llmlab's own directory, Hugging Face tokenizer.json, tiktoken rank files.

- llmlab.json (inside a tokenizer directory, next to a tokenizer.json): {"format": "llmlab-tokenizer",
  "format_version": 1, "pattern", "pattern_name", "semantics", "special_tokens", "options", "merges",
  "tokens"}. "tokens" is null for the trained layout (ids 0-255 = bytes, 256 + i = merge i), else one
  base64 string (or null) per id. "chat_template" (optional) is the stored chat template
  (llmlab.tokenizer.chat.ChatFormat.to_json). A file with a higher format_version was written by a newer
  llmlab and is refused with a message to upgrade.
- tokenizer.json (Hugging Face `tokenizers`): a BPE model over byte-level strings. HF maps each byte to
  a printable character (GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 bytes
  for U+0100 onwards) so that vocab entries and merges are strings; we translate both ways. The
  pre-tokenizer is ByteLevel (GPT-2 regex built in) or Sequence[Split(regex), ByteLevel(use_regex=false)].
- tokenizer_config.json / chat_template.jinja (beside a tokenizer.json): the model's Jinja chat template and
  the special-token names it reads (bos_token, eos_token, ...), as transformers loads them.
- .tiktoken: one "<base64 bytes> <rank>" line per token; the rank is the id and the merge priority.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from pathlib import Path

import regex

from llmlab import __version__
from llmlab.errors import TokenizerError
from llmlab.fsutil import atomic_dir, write_text_atomic
from llmlab.tokenizer.chat import ChatFormat
from llmlab.tokenizer.patterns import (
    GPT2_PATTERN,
    from_hf_spelling,
    hf_spelling,
    pattern_name,
    resolve_pattern,
)
from llmlab.tokenizer.reference import rank_bpe
from llmlab.tokenizer.spec import MAX_UNUSED_IDS, NORMALIZERS, EncodingOptions, TokenizerSpec

FORMAT = "llmlab-tokenizer"
FORMAT_VERSION = 1
LLMLAB_JSON = "llmlab.json"
HF_JSON = "tokenizer.json"
HF_CONFIG, HF_CHAT_JINJA = "tokenizer_config.json", "chat_template.jinja"
# The special-token names transformers passes to a chat template (its special_tokens_map).
HF_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# ByteLevel with use_regex=false and no Split: the whole text is one chunk.
WHOLE_TEXT_PATTERN = r"[\s\S]+"


# ---- the byte <-> character alphabet of byte-level BPE (GPT-2) ---------------------------------------------

@functools.cache
def byte_to_char() -> tuple[str, ...]:
    """Character standing for each byte: printable Latin-1 bytes map to themselves, the rest to U+0100+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@functools.cache
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_char())}


def bytes_to_hf(data: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in data)


def hf_to_bytes(text: str) -> bytes | None:
    """The bytes a byte-level string stands for, or None if it has characters outside the alphabet."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


# ---- llmlab's own directory --------------------------------------------------------------------------------

def _trained_layout(spec: TokenizerSpec) -> bool:
    """Ids 0-255 are the bytes and id 256 + i is merge i: then the token table need not be stored."""
    tokens = spec.tokens
    n = 256 + len(spec.merges)
    return (len(tokens) >= n and all(tokens[b] == bytes([b]) for b in range(256))
            and all(tokens[256 + i] == tokens[a] + tokens[b] for i, (a, b) in enumerate(spec.merges))
            and all(t is None for t in tokens[n:]))


def llmlab_json(spec: TokenizerSpec) -> dict:
    opts = spec.options
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llmlab_version": __version__,
        "semantics": spec.semantics,
        "pattern": spec.pattern,
        "pattern_name": pattern_name(spec.pattern),
        "special_tokens": dict(spec.special_tokens),
        "options": {"prefix_space": opts.prefix_space, "ignore_merges": opts.ignore_merges,
                    "unk_id": opts.unk_id, "fuse_unk": opts.fuse_unk, "normalizer": opts.normalizer},
        "vocab_size": spec.vocab_size,
        "merges": [list(m) for m in spec.merges],
        "tokens": None if _trained_layout(spec) else
        [None if t is None else base64.b64encode(t).decode("ascii") for t in spec.tokens],
        **({"chat_template": spec.chat_format.to_json()} if spec.chat_format is not None else {}),
    }


def check_output_dir(directory: Path) -> None:
    """Refuse to replace a directory that is not a tokenizer (saving swaps the whole directory)."""
    if directory.exists():
        if not directory.is_dir():
            raise TokenizerError(f"{directory} exists and is a file; choose a directory path for the "
                                 f"tokenizer")
        if any(directory.iterdir()) and not (directory / LLMLAB_JSON).is_file():
            raise TokenizerError(f"{directory} exists and is not a tokenizer directory (no {LLMLAB_JSON}); "
                                 f"choose a new path or empty it first")


def write_llmlab_dir(spec: TokenizerSpec, directory: Path) -> None:
    check_output_dir(directory)
    text = json.dumps(llmlab_json(spec), ensure_ascii=False)
    hf = hf_json_text(spec)
    with atomic_dir(directory) as tmp:
        (tmp / LLMLAB_JSON).write_text(text, encoding="utf-8")
        (tmp / HF_JSON).write_text(hf, encoding="utf-8")


def read_llmlab_dir(directory: Path) -> TokenizerSpec:
    path = directory / LLMLAB_JSON
    if directory.exists() and not directory.is_dir():
        raise TokenizerError(f"{directory} is a file, not a tokenizer directory; pass the directory that "
                             f"holds {LLMLAB_JSON} (a tokenizer.json file imports with Tokenizer.from_hf)")
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist; train one with "
                             f"`llmlab tokenizer train SOURCES --out {directory}` or pass the right "
                             f"directory")
    if not path.is_file():
        hint = (f"; it has a tokenizer.json, import that with Tokenizer.from_hf('{directory / HF_JSON}')"
                if (directory / HF_JSON).is_file() else "")
        raise TokenizerError(f"{path} not found: {directory} is not an llmlab tokenizer directory{hint}")
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TokenizerError(f"{path} is not an llmlab tokenizer file (no \"format\": \"{FORMAT}\"); "
                             f"save the tokenizer again with llmlab")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TokenizerError(f"{path} has no positive integer format_version; save the tokenizer again "
                             f"with llmlab")
    if version > FORMAT_VERSION:
        raise TokenizerError(
            f"{path} has tokenizer format version {version}, written by a newer llmlab "
            f"({data.get('llmlab_version', '?')}); this llmlab {__version__} reads up to version "
            f"{FORMAT_VERSION}: upgrade llmlab (pip install -U llmlab)")
    try:
        spec = _spec_from_llmlab(data)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}; save the tokenizer again or restore the file") from None
    return spec


def _spec_from_llmlab(data: dict) -> TokenizerSpec:
    """The spec an llmlab.json document describes, every field's type checked (TokenizerError otherwise)."""
    missing = [key for key in ("pattern", "special_tokens", "merges", "tokens") if key not in data]
    if missing:
        raise TokenizerError(f"missing key {missing[0]!r}")
    merges = [_id_pair(m, f"merge #{k}") for k, m in enumerate(_typed(data["merges"], list, "merges"))]
    if data["tokens"] is None:  # the trained layout: 0-255 are the bytes, 256 + k is merge k
        tokens: list[bytes | None] = [bytes([b]) for b in range(256)]
        for k, (a, b) in enumerate(merges):
            if not (a < len(tokens) and b < len(tokens)):
                raise TokenizerError(f"merge #{k} ({a}, {b}) uses a token no earlier merge made")
            tokens.append(tokens[a] + tokens[b])
    else:
        tokens = [_token_bytes(t, i) for i, t in enumerate(_typed(data["tokens"], list, "tokens"))]
    specials = _typed(data["special_tokens"], dict, "special_tokens")
    options = _typed(data.get("options", {}), dict, "options")
    unknown = set(options) - set(EncodingOptions.__dataclass_fields__)
    if unknown:
        raise TokenizerError(f"unknown option {sorted(unknown)[0]!r}")
    chat = data.get("chat_template")
    return TokenizerSpec(tokens, merges, _typed(data["pattern"], str, "pattern"),
                         {name: _id(i, f"special token {name!r}") for name, i in specials.items()},
                         semantics=data.get("semantics", "merges"), options=EncodingOptions(**options),
                         chat_format=None if chat is None else ChatFormat.from_json(chat))


def _typed(value, kind: type, what: str):
    if not isinstance(value, kind):
        raise TokenizerError(f"{what} is {type(value).__name__}, not {kind.__name__}")
    return value


def _id(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TokenizerError(f"{what} has id {value!r}, not a non-negative integer")
    return value


def _id_pair(value, what: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise TokenizerError(f"{what} is {value!r}, not a pair of ids")
    return _id(value[0], what), _id(value[1], what)


def _token_bytes(value, token_id: int) -> bytes | None:
    if value is None:
        return None
    try:
        data = base64.b64decode(_typed(value, str, f"token {token_id}"), validate=True)
    except (binascii.Error, ValueError):
        raise TokenizerError(f"token {token_id} is not valid base64: {value[:40]!r}") from None
    if not data:
        raise TokenizerError(f"token {token_id} is empty")
    return data


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path} does not exist; check the path") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise TokenizerError(f"cannot read {path} ({e.strerror or e}); pass a readable tokenizer "
                             f"file") from None
    except RecursionError:
        raise TokenizerError(f"{path} nests JSON too deeply to be a tokenizer file; restore the "
                             f"file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); restore or regenerate the file") from None


# ---- Hugging Face tokenizer.json --------------------------------------------------------------------

def _byte_level(prefix_space: bool, use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": True,
            "use_regex": use_regex}


def hf_json(spec: TokenizerSpec) -> dict:
    """The tokenizer as a Hugging Face tokenizer.json document."""
    opts = spec.options
    name = pattern_name(spec.pattern)
    if name == "gpt2":  # HF's ByteLevel has exactly this regex built in
        pre = _byte_level(opts.prefix_space, True)
    elif spec.pattern == WHOLE_TEXT_PATTERN:
        pre = _byte_level(opts.prefix_space, False)
    else:
        if opts.prefix_space:  # HF would add the space to every regex chunk, not once per text
            raise TokenizerError("a tokenizer with prefix_space and a custom pattern cannot be written as "
                                 "tokenizer.json; HF would add the space before every chunk")
        split = {"type": "Split", "pattern": {"Regex": hf_spelling(spec.pattern, name)},
                 "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, _byte_level(False, False)]}
    tokens = spec.tokens
    if spec.semantics == "ranks":
        merges, ignore_merges = derive_merges(tokens), True  # the way HF converts tiktoken vocabularies
    else:
        merges, ignore_merges = spec.merges, opts.ignore_merges
    special_ids = set(spec.special_tokens.values())
    unk = None
    if opts.unk_id is not None:
        unk = spec.token_bytes(opts.unk_id).decode("utf-8") if opts.unk_id in special_ids else \
            bytes_to_hf(tokens[opts.unk_id])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(spec.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": {"type": opts.normalizer} if opts.normalizer else None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": _byte_level(True, True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": opts.fuse_unk, "byte_fallback": False,
            "ignore_merges": ignore_merges,
            # Special tokens are listed in the vocab too (as HF's own files do): an added token absent from
            # it would be given the next free id on loading, not its own.
            "vocab": {**spec.special_tokens,
                      **{bytes_to_hf(t): i for i, t in enumerate(tokens) if t is not None}},
            "merges": [[bytes_to_hf(tokens[a]), bytes_to_hf(tokens[b])] for a, b in merges],
        },
    }


def hf_json_text(spec: TokenizerSpec) -> str:
    return json.dumps(hf_json(spec), ensure_ascii=False, indent=1)


def write_hf(spec: TokenizerSpec, path: Path) -> None:
    write_text_atomic(path, hf_json_text(spec))


def derive_merges(tokens: list[bytes | None]) -> list[tuple[int, int]]:
    """Merge rules for a rank-defined vocabulary (id = rank): token T's rule is the last merge that rank
    BPE, restricted to ranks below T's, makes on T's bytes. Tokens rank BPE never builds get no rule."""
    ranks = {t: i for i, t in enumerate(tokens) if t is not None}
    merges = []
    for rank, t in enumerate(tokens):
        if t is None or len(t) < 2:
            continue
        parts = rank_bpe(t, ranks, whole_piece=False, below=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _parse_pre_tokenizer(pre) -> tuple[str, bool]:
    """(pattern, prefix_space) for the byte-level pre-tokenizers we can reproduce exactly."""
    unsupported = TokenizerError(
        f"pre_tokenizer {json.dumps(pre)[:120]} is not supported; llmlab imports byte-level BPE with "
        f"a ByteLevel pre-tokenizer, optionally after one Split(regex, behavior=Isolated)")
    if not isinstance(pre, dict):
        raise unsupported
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps or not all(isinstance(step, dict) for step in steps):
        raise unsupported
    last = steps[-1]
    if last.get("type") != "ByteLevel":
        raise unsupported
    prefix = _flag(last, "add_prefix_space", True, "ByteLevel")
    use_regex = _flag(last, "use_regex", True, "ByteLevel")
    if len(steps) == 1:
        return (GPT2_PATTERN if use_regex else WHOLE_TEXT_PATTERN), prefix
    split = steps[0]
    if (len(steps) != 2 or use_regex or prefix or split.get("type") != "Split" or split.get("invert")
            or str(split.get("behavior", "")).lower() != "isolated"):
        raise unsupported
    pattern = split.get("pattern")
    if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
        text = pattern["Regex"]
    elif isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
        text = regex.escape(pattern["String"])
    else:
        raise unsupported
    return from_hf_spelling(text)[0], False


def _flag(obj: dict, key: str, default: bool, what: str) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerError(f"{what} {key}={value!r} is not true or false")
    return value


def _parse_normalizer(norm) -> str | None:
    if norm is None:
        return None
    if isinstance(norm, dict) and norm.get("type") in NORMALIZERS:
        return norm["type"]
    if isinstance(norm, dict) and norm.get("type") == "Sequence" and norm.get("normalizers") in (None, []):
        return None
    raise TokenizerError(f"normalizer {json.dumps(norm)[:100]} is not supported (only none or a "
                         f"Unicode normal form NFC/NFD/NFKC/NFKD)")


def _check_decoder(dec) -> None:
    steps = dec.get("decoders") if isinstance(dec, dict) and dec.get("type") == "Sequence" else [dec]
    if dec is None or (isinstance(steps, list)
                       and all(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)):
        return
    raise TokenizerError(f"decoder {json.dumps(dec)[:100]} is not supported; byte-level BPE "
                         f"tokenizers use the ByteLevel decoder")


def hf_json_path(path: Path) -> Path:
    """The tokenizer.json a path names: the file itself, or the one inside a directory."""
    return path / HF_JSON if path.is_dir() else path


def read_hf(path: Path) -> TokenizerSpec:
    """Read a tokenizer.json (see `hf_json_path`) as a merge-list tokenizer with HF's ids.

    Added tokens (special or not) become special tokens: recognised only when allowed_special says so,
    where HF always splits them out of the text.
    """
    path = hf_json_path(path)
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise TokenizerError(f"{path} has no \"model\" object; is it a Hugging Face tokenizer.json?")
    try:
        return _spec_from_hf(data, model)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


def read_hf_chat(directory: Path) -> tuple[str | None, dict[str, str]]:
    """(Jinja chat template or None, {bos_token: text, ...}) from a HF tokenizer directory: the template of
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of named
    templates whose "default" is taken), as transformers reads them."""
    config_file = directory / HF_CONFIG
    config = _read_json(config_file) if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
    variables = {}
    for name in HF_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[name] = value
    jinja_file = directory / HF_CHAT_JINJA
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), variables
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja_file} ({e}); re-download it or delete it") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template is {type(template).__name__}, not a Jinja string "
                             "or a list of named templates with a 'default'")
    return template or None, variables


def _spec_from_hf(data: dict, model: dict) -> TokenizerSpec:
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise TokenizerError(f"model type {kind!r} is not supported; llmlab imports byte-level BPE "
                             f"tokenizers (GPT-2, Llama 3, Qwen style), not WordPiece/Unigram/WordLevel")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"BPE {key}={model[key]!r} is not supported by byte-level BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise TokenizerError(f"BPE dropout={model['dropout']} makes encoding random; set it to null")
    pattern, prefix_space = _parse_pre_tokenizer(data.get("pre_tokenizer"))
    normalizer = _parse_normalizer(data.get("normalizer"))
    _check_decoder(data.get("decoder"))
    vocab = _hf_vocab(model.get("vocab"))
    added = _hf_added(data.get("added_tokens"))
    _check_id_range([*vocab.values(), *added.values()], len(vocab) + len(added))
    tokens: list[bytes | None] = [None] * (1 + max([*vocab.values(), *added.values(), -1]))
    special_ids = set(added.values())
    for text, i in vocab.items():
        if i in special_ids:  # HF trainers also list special tokens in the model vocab
            continue
        data_bytes = hf_to_bytes(text)
        if data_bytes is None:
            raise TokenizerError(f"vocab entry {text!r} (id {i}) is not a byte-level string; "
                                 f"only byte-level BPE vocabularies can be imported")
        tokens[i] = data_bytes
    rules = _typed(model.get("merges") or [], list, "merges")
    merges = [_hf_merge(k, rule, vocab) for k, rule in enumerate(rules)]
    unk = model.get("unk_token")
    unk_id = None if unk is None else added.get(unk, vocab.get(unk))
    if unk is not None and unk_id is None:
        raise TokenizerError(f"unk_token {unk!r} is neither in the vocab nor an added token")
    options = EncodingOptions(prefix_space=prefix_space,
                              ignore_merges=_flag(model, "ignore_merges", False, "BPE"), unk_id=unk_id,
                              fuse_unk=_flag(model, "fuse_unk", False, "BPE"), normalizer=normalizer)
    return TokenizerSpec(tokens, merges, pattern, added, options=options)


def _hf_vocab(vocab) -> dict[str, int]:
    """The model's vocab: distinct non-negative integer ids."""
    by_id: dict[int, str] = {}
    for text, i in _typed(vocab if vocab is not None else {}, dict, "vocab").items():
        _id(i, f"vocab entry {text!r}")
        if i in by_id:
            raise TokenizerError(f"vocab entries {by_id[i]!r} and {text!r} share id {i}; each id names one "
                                 f"token")
        by_id[i] = text
    return vocab or {}


def _hf_added(added) -> dict[str, int]:
    """added_tokens as {content: id}: each a distinct non-empty string with its own id."""
    out: dict[str, int] = {}
    for k, entry in enumerate(_typed(added if added is not None else [], list, "added_tokens")):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise TokenizerError(f"added_tokens[{k}] is not an object with a non-empty \"content\" string")
        content, i = entry["content"], _id(entry.get("id"), f"added token {entry['content']!r}")
        if content in out and out[content] != i:
            raise TokenizerError(f"added token {content!r} is listed with ids {out[content]} and {i}")
        if i in out.values() and out.get(content) != i:
            other = next(c for c, j in out.items() if j == i)
            raise TokenizerError(f"added tokens {other!r} and {content!r} share id {i}")
        out[content] = i
    return out


def _hf_merge(k: int, rule, vocab: dict[str, int]) -> tuple[int, int]:
    parts = rule.split(" ") if isinstance(rule, str) else rule
    if (not isinstance(parts, list) or len(parts) != 2
            or not all(isinstance(p, str) and p in vocab for p in parts)):
        raise TokenizerError(f"merge #{k} {rule!r} is not a pair of tokens from the vocab")
    return vocab[parts[0]], vocab[parts[1]]


def _check_id_range(ids: list[int], count: int) -> None:
    """Ids may leave a few unused values, not so many that the table would be mostly holes."""
    top = max(ids, default=-1)
    if top >= count + MAX_UNUSED_IDS:
        raise TokenizerError(f"id {top} is far past the {count} tokens listed (at most {MAX_UNUSED_IDS} "
                             f"ids may be unused); the file is corrupt")


# ---- tiktoken rank files --------------------------------------------------------------------------------

def read_tiktoken(path: Path, pattern: str, specials) -> TokenizerSpec:
    """Import a .tiktoken file; ids are ranks, and encoding follows tiktoken's rank semantics."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{path} does not exist; pass the path of a .tiktoken rank file") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path} is a directory; pass the path of a .tiktoken rank file") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {path} ({e.strerror or e}); pass a readable .tiktoken "
                             f"file") from None
    ranks: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank_text)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}; "
                                 f"is this a .tiktoken file?") from None
        if rank < 0 or rank in ranks or token in seen or not token:
            raise TokenizerError(f"{path}:{lineno}: rank {rank} or token {token!r} is negative, empty or "
                                 f"repeated; each token and rank must appear once")
        ranks[rank] = token
        seen[token] = rank
    if not ranks:
        raise TokenizerError(f"{path} has no tokens; pass a non-empty .tiktoken file")
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise TokenizerError(f"{path} lacks single-byte tokens (e.g. byte 0x{missing[0]:02x}); "
                             f"byte-level BPE needs all 256")
    try:
        _check_id_range(list(ranks), len(ranks))
        tokens: list[bytes | None] = [None] * (max(ranks) + 1)
        for rank, token in ranks.items():
            tokens[rank] = token
        special_ids = _tiktoken_specials(specials, len(tokens))
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    return TokenizerSpec(tokens, [], resolve_pattern(pattern)[0], special_ids, semantics="ranks")


def _tiktoken_specials(specials, first_id: int) -> dict[str, int]:
    """{token: id} from a dict (ids checked) or a list (ids from first_id on, each token once)."""
    if specials is None:
        return {}
    if isinstance(specials, dict):
        return {_typed(name, str, "a special token's name"): _id(i, f"special token {name!r}")
                for name, i in specials.items()}
    if isinstance(specials, str):
        raise TokenizerError(f"specials must be a list of strings or a dict, not the string {specials!r}")
    names = list(specials)
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise TokenizerError(f"special token {repeated!r} is listed twice; list each once")
    return {_typed(name, str, "a special token's name"): first_id + k for k, name in enumerate(names)}
