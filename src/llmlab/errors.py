"""User-facing errors.

Anything a user can cause (a missing file, a bad option, a corrupt checkpoint) raises a subclass of
`LLMLabError` whose message names the file/key/value and the fix. The CLI prints it as one line on
stderr and exits with code 2; everything else is a bug and keeps its traceback.
"""


class LLMLabError(Exception):
    """Base class for errors caused by user input."""

    exit_code = 2


class ConfigError(LLMLabError):
    """A bad configuration key or value."""


class DataError(LLMLabError):
    """A missing, empty or corrupt input file (corpus, shard, token file)."""


class TokenizerError(LLMLabError):
    """A bad tokenizer file, option or input text."""


class CheckpointError(LLMLabError):
    """A missing, incomplete or mismatched checkpoint."""


class ModelError(LLMLabError):
    """A model configuration or input that cannot work (e.g. a prompt longer than the context)."""


class OutputError(LLMLabError):
    """An output path that must not or cannot be written: it holds an input or someone's files, it lies under
    a regular file or in a directory without write access, or the disk filled up while writing it."""
