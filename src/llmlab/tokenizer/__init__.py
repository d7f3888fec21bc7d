"""Byte-level BPE tokenizer: fast training, tiktoken-backed encoding, HF tokenizer.json and tiktoken formats.

    from llmlab import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=8192)          # texts: an iterable of documents
    ids = tok.encode("Hello world")                        # raises if the text contains a special token
    tok.decode(ids); tok.save("tokenizer"); Tokenizer.load("tokenizer")

Modules: core (the Tokenizer), train (counting chunks and learning merges), reference (pure-Python
encoders, the specification the tiktoken path is checked against), patterns (pre-tokenization regexes),
spec (a tokenizer as plain data), formats (llmlab.json, tokenizer.json, .tiktoken: specs to and from
files), chat (chat templates: conversations to ids + loss mask, HF Jinja templates), identity
(fingerprints), tools (inspect and stats for the CLI).
"""

from llmlab.tokenizer.core import DEFAULT_SPECIAL_TOKENS, Tokenizer
from llmlab.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from llmlab.tokenizer.spec import EncodingOptions

__all__ = ["Tokenizer", "EncodingOptions", "DEFAULT_SPECIAL_TOKENS", "PATTERNS", "GPT4_PATTERN",
           "GPT2_PATTERN"]
