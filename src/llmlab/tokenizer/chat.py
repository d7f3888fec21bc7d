"""Chat templates: a conversation rendered to token ids plus a loss mask, for llmlab's format and HF's.

    ids, loss_mask = tok.apply_chat_template([{"role": "user", "content": "2+2?"},
                                              {"role": "assistant", "content": "4"}])
    tok.chat_template.end_of_turn_id, tok.chat_template.stop_ids, tok.chat_template.pad_id

Every template is a Jinja string, rendered by jinja2 in its sandbox with what transformers gives a template
(trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson filter, the tokenizer's
bos_token/eos_token/... names), so one code path serves llmlab's own template and the chat_template a Hugging
Face model ships in tokenizer_config.json. The rendered text is encoded whole with special tokens recognised
(transformers' add_special_tokens=False), so the ids are exactly those of transformers' apply_chat_template.

Loss mask: 1 on what an assistant writes, its end-of-turn token included, 0 elsewhere. A template with
{% generation %}...{% endgeneration %} markers (llmlab's, and those TRL's assistant_only_loss needs) says
where that is. For a template without markers each assistant turn's span is found by rendering prefixes:
the conversation before the turn plus the generation prompt (where the reply starts), and up to and including
the turn (where it ends); the span is cut after its first end-of-turn token, since what a template writes
after it (ChatML's newline) is never generated. A token counts when it starts inside a span.

llmlab's format:  <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
No newline after a role token: the special tokens split the text anyway, and a reply's first word then
tokenizes as at the start of a document. <|pad|> pads batches and is never the end of a turn, so a model
trained on padded batches is not taught to stop where padding was.

On disk: llmlab.json in a tokenizer directory keeps the template under "chat_template" (ChatFormat.to_json),
so a checkpoint's tokenizer/ copy carries it, and a later llmlab renders an old model's chats as they were
trained. A tokenizer with no stored template but llmlab's chat tokens uses llmlab's template.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.errors import TokenizerError

ROLES = ("system", "user", "assistant")
SOURCES = ("llmlab", "hf")
END_OF_TURN = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# The tokens llmlab's template writes, plus its padding token: what with_chat_tokens adds when missing.
LLMLAB_CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN, PAD)
# Spellings of a padding token other tokenizers use, tried when a template's files name none.
PAD_NAMES = (PAD, "<pad>", "<|padding|>", "[PAD]")

LLMLAB_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>\n"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>\n"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role'] ~ ' (system, user, assistant)') }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}\n")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = ("llmlab-probe-question", "llmlab-probe-reply")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as plain data (what llmlab.json stores).

    template: the Jinja source; source: "llmlab" or "hf" (imported with a model); end_of_turn: the special
    token that ends a turn; stop: the special tokens that end an assistant's reply (end_of_turn first);
    pad: the padding token (never end_of_turn), None until with_chat_tokens gives one; variables: the
    names a template reads besides messages (bos_token, eos_token, ...), as transformers passes them.
    """

    template: str
    source: str
    end_of_turn: str
    stop: tuple[str, ...] = ()
    pad: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.template, str) or not self.template:
            raise TokenizerError("chat_template.template must be a non-empty Jinja string")
        if self.source not in SOURCES:
            raise TokenizerError(f"chat_template.source is {self.source!r}; use 'llmlab' or 'hf'")
        for name in ("end_of_turn", "pad"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (name == "pad" and value is None):
                raise TokenizerError(f"chat_template.{name} is {value!r}, not a special token's text")
        stop = (self.end_of_turn, *(s for s in self.stop if s != self.end_of_turn))
        if not all(isinstance(s, str) and s for s in stop):
            raise TokenizerError(f"chat_template.stop is {list(self.stop)!r}; list special tokens' texts")
        object.__setattr__(self, "stop", tuple(dict.fromkeys(stop)))
        if self.pad is not None and self.pad in self.stop:
            raise TokenizerError(f"chat_template.pad {self.pad!r} also ends a turn; padding must be a token "
                                 "that never ends a reply")
        if not isinstance(self.variables, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.variables.items()):
            raise TokenizerError("chat_template.variables must map names to strings")
        object.__setattr__(self, "variables", dict(self.variables))

    def tokens(self) -> tuple[str, ...]:
        """The special tokens this format needs in its tokenizer."""
        written = tuple(ROLE_TOKENS.values()) if self.source == "llmlab" else ()
        return tuple(dict.fromkeys((*written, *self.stop, *((self.pad,) if self.pad else ()))))

    def to_json(self) -> dict:
        return {"source": self.source, "template": self.template, "end_of_turn": self.end_of_turn,
                "stop": list(self.stop), "pad": self.pad, "variables": dict(self.variables)}

    @classmethod
    def from_json(cls, data) -> ChatFormat:
        if not isinstance(data, dict):
            raise TokenizerError(f"chat_template is {type(data).__name__}, not an object")
        unknown = set(data) - {"source", "template", "end_of_turn", "stop", "pad", "variables"}
        if unknown:
            raise TokenizerError(f"chat_template has unknown key {sorted(unknown)[0]!r}")
        missing = [k for k in ("source", "template", "end_of_turn") if k not in data]
        if missing:
            raise TokenizerError(f"chat_template lacks {missing[0]!r}")
        stop = data.get("stop", [])
        if not isinstance(stop, list):
            raise TokenizerError(f"chat_template.stop is {type(stop).__name__}, not a list")
        return cls(data["template"], data["source"], data["end_of_turn"], tuple(stop), data.get("pad"),
                   data.get("variables", {}))


def llmlab_format(special_tokens: Mapping[str, int]) -> ChatFormat:
    """llmlab's own format; a tokenizer's <|eos|> (if any) also stops a reply."""
    stop = (END_OF_TURN, *(("<|eos|>",) if "<|eos|>" in special_tokens else ()))
    return ChatFormat(LLMLAB_TEMPLATE, "llmlab", END_OF_TURN, stop, PAD)


def has_llmlab_tokens(special_tokens: Mapping[str, int]) -> bool:
    return all(t in special_tokens for t in LLMLAB_CHAT_TOKENS)


def resolve_format(stored: ChatFormat | None, special_tokens: Mapping[str, int]) -> ChatFormat | None:
    """The format a tokenizer chats in: its stored one, else llmlab's when it has llmlab's chat tokens."""
    if stored is None and has_llmlab_tokens(special_tokens):
        return llmlab_format(special_tokens)
    return stored


def hf_format(template: str, variables: Mapping[str, str], special_tokens: Mapping[str, int]) -> ChatFormat:
    """The format of a Hugging Face chat template. Its end-of-turn token is the first special token the
    template writes after an assistant's reply (ChatML <|im_end|>, Llama 3 <|eot_id|>), else eos_token; its
    pad is pad_token (or a common spelling) when that is a special token distinct from the end of turn."""
    variables = {k: v for k, v in variables.items() if isinstance(v, str)}
    conversation = [{"role": "user", "content": _PROBE[0]}, {"role": "assistant", "content": _PROBE[1]}]
    text, _ = render(_compile(template), conversation, False, variables)
    end = _first_special_after(text, text.find(_PROBE[1]), special_tokens) if _PROBE[1] in text else None
    end = end or variables.get("eos_token")
    if end is None or end not in special_tokens:
        raise TokenizerError("the chat template writes no special token after an assistant's reply and "
                             "names no eos_token, so the end of a turn is unknown; set eos_token in "
                             "tokenizer_config.json")
    stop = [end, *(t for t in (variables.get("eos_token"),) if t in special_tokens)]
    pads = [variables.get("pad_token"), *PAD_NAMES]
    pad = next((p for p in pads if p in special_tokens and p not in stop), None)
    return ChatFormat(template, "hf", end, tuple(stop), pad, variables)


def _first_special_after(text: str, start: int, special_tokens: Mapping[str, int]) -> str | None:
    hits = [(text.find(s, start), -len(s), s) for s in special_tokens if text.find(s, start) >= 0]
    return min(hits)[2] if hits else None


class ChatTemplate:
    """A ChatFormat bound to a tokenizer's special-token ids; renders and encodes conversations."""

    def __init__(self, fmt: ChatFormat, special_tokens: Mapping[str, int]):
        missing = [t for t in fmt.tokens() if t not in special_tokens]
        if missing:
            raise TokenizerError(f"the chat template needs the special token {missing[0]!r}, which the "
                                 "tokenizer lacks; add the chat tokens with "
                                 "llmlab.tokenizer.chat.with_chat_tokens (fine-tuning does it)")
        self.format = fmt
        self.end_of_turn_id: int = special_tokens[fmt.end_of_turn]
        self.stop_ids: tuple[int, ...] = tuple(special_tokens[t] for t in fmt.stop)
        self.pad_id: int | None = None if fmt.pad is None else special_tokens[fmt.pad]
        self._specials = dict(special_tokens)
        self._compiled = _compile(fmt.template)
        self._markers = bool(_GENERATION_TAG.search(fmt.template))

    @property
    def source(self) -> str:
        return self.format.source

    @property
    def template(self) -> str:
        return self.format.template

    def __repr__(self) -> str:
        return (f"ChatTemplate(source={self.source!r}, end_of_turn_id={self.end_of_turn_id}, "
                f"stop_ids={list(self.stop_ids)}, pad_id={self.pad_id})")

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation as the template's text (checked messages; what transformers renders)."""
        return render(self._compiled, check_messages(messages, self._specials), add_generation_prompt,
                      self.format.variables)[0]

    def apply(self, tok, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation, encoded by `tok` (a Tokenizer)."""
        messages = check_messages(messages, self._specials)
        text, spans = render(self._compiled, messages, add_generation_prompt, self.format.variables)
        if not self._markers:
            spans = self._prefix_spans(messages, text)
        ids = tok.encode(text, allowed_special="all")
        return ids, self._mask(tok, ids, text, spans, cut=not self._markers)

    def _prefix_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Each assistant turn's characters, from renderings of the conversation before and through it."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(self._compiled, messages[:i], True, self.format.variables)[0]
            through = render(self._compiled, messages[:i + 1], False, self.format.variables)[0]
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise TokenizerError(
                    f"the chat template does not render conversations append-only (turn {i} renders "
                    "differently inside the whole conversation), so the assistant tokens cannot be found; "
                    "mark them with {% generation %}...{% endgeneration %} in the template")
            spans.append((len(before), len(through)))
        return spans

    def _mask(self, tok, ids: list[int], text: str, spans, cut: bool) -> list[int]:
        """1 for each token that starts inside a span (cut after the span's first stop token if `cut`)."""
        byte_at = _byte_offsets(text)
        byte_spans = [(byte_at[a], byte_at[b]) for a, b in spans]
        mask, pos = [], 0
        starts = []
        for i in ids:
            starts.append(pos)
            pos += len(tok.token_bytes(i))
        if pos != byte_at[len(text)]:
            raise TokenizerError("this tokenizer does not reproduce the rendered chat byte for byte (it "
                                 "normalises text or adds a prefix space), so the loss mask cannot be placed")
        stops = set(self.stop_ids)
        k = 0
        for a, b in byte_spans:
            while k < len(ids) and starts[k] < a:
                mask.append(0)
                k += 1
            while k < len(ids) and starts[k] < b:
                mask.append(1)
                k += 1
                if cut and ids[k - 1] in stops:
                    break
        mask += [0] * (len(ids) - len(mask))
        return mask


def check_messages(messages, special_tokens: Mapping[str, str | int] = ()) -> list[dict]:
    """The conversation as [{"role", "content"}] dicts; TokenizerError (one line) for a bad one."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} objects, not "
                             f"{type(messages).__name__}")
    if not messages:
        raise TokenizerError("messages is empty; a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] is {type(m).__name__}, not an object with 'role' and "
                                 "'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TokenizerError(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}] ({role}) has content of type {type(content).__name__}; "
                                 "content must be a string")
        found = next((s for s in special_tokens if s in content), None)
        if found is not None:
            raise TokenizerError(f"messages[{i}] ({role}) contains the special token {found!r} as text; "
                                 "remove it (a message cannot write control tokens)")
        out.append({"role": role, "content": content})
    return out


def with_chat_tokens(tok, fmt: ChatFormat | None = None):
    """(tok2, added): `tok` with the special tokens its chat template needs, and the template stored.

    The template is `fmt`, else the tokenizer's own (an imported model's), else llmlab's. Missing tokens get
    ids after the vocabulary (tok.vocab_size onward); a format without a padding token gets <|pad|>. `added`
    lists the new tokens' texts; with none added and the template already stored, tok itself is returned.
    """
    fmt = fmt or resolve_format(tok.chat_format, tok.special_tokens) or llmlab_format(tok.special_tokens)
    if fmt.pad is None:
        fmt = replace(fmt, pad=PAD)
    specials = tok.special_tokens
    added = [t for t in fmt.tokens() if t not in specials]
    if not added and tok.chat_format == fmt:
        return tok, []
    new_specials = {**specials, **{t: tok.vocab_size + k for k, t in enumerate(added)}}
    spec = replace(tok.spec(), special_tokens=new_specials, chat_format=fmt)
    return type(tok).from_spec(spec), added


# ---- rendering ---------------------------------------------------------------------------------------------

_tracking: contextvars.ContextVar = contextvars.ContextVar("llmlab_chat_spans", default=None)


class _GenerationSpans(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: records the character span of what the block renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

    def _span(self, caller) -> str:
        text = caller()
        state = _tracking.get()
        if state is not None:
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so a template cannot reach Python internals through it
    (a downloaded template is untrusted code; transformers guards the same way)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so namespace(self=...) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationSpans, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


_ENV = _environment()
_COMPILED: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    compiled = _COMPILED.get(template)
    if compiled is None:
        try:
            compiled = _ENV.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                                 "fix chat_template") from None
        _COMPILED[template] = compiled
    return compiled


def render(compiled: jinja2.Template, messages: list[dict], add_generation_prompt: bool,
           variables: Mapping[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """(text, generation spans in characters) of a conversation."""
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _tracking.set((blocks, spans))
    try:
        # tools and documents are None, as transformers passes them (a template may test `tools is not none`)
        context = {**variables, "messages": messages, "tools": None, "documents": None,
                   "add_generation_prompt": add_generation_prompt}
        for block in compiled.generate(context):
            blocks.append(block)
    except jinja2.TemplateError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"the chat template refused the conversation: {message}") from None
    finally:
        _tracking.reset(token)
    return "".join(blocks), spans


def _byte_offsets(text: str) -> list[int]:
    """byte offset (UTF-8, lone surrogates as 3 bytes like U+FFFD) of each character index, len(text) incl."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8", "surrogatepass")))
    return out
