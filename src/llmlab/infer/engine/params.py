"""What a request asks for (SamplingParams) and what it gets back, step by step (StepOutput)."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import ConfigError
from llmlab.infer.sampling import check_sampling


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    max_tokens: new tokens at most (None: up to the model's context). temperature 0 is greedy; top_p 1.0 and
    top_k None keep every token (llmlab.infer.sampling). seed: a private generator, so the same seed gives
    the same tokens whatever else runs beside the request. stop: strings that end the output (cut from the
    text); stop_token_ids: ids that end it (the id is kept in token_ids, its text is left out). logprobs:
    None, or how many top alternatives to report with each chosen token's log-probability (0: none).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a str, a list or None are accepted too
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise ConfigError(f"max_tokens={self.max_tokens!r} must be an integer >= 0, or None to fill the "
                              "context")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else _sequence(self.stop)
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop={self.stop!r} must be a non-empty string or a list of them")
        stop_ids = _sequence(self.stop_token_ids)
        if stop_ids is None or not all(_is_int(i) and i >= 0 for i in stop_ids):
            raise ConfigError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids "
                              "(ints >= 0)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ConfigError(f"logprobs={self.logprobs!r} must be an integer >= 0 (alternatives per token), "
                              "or None")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)


def _sequence(x) -> tuple | None:
    """A list/tuple (or None) as a tuple; None for anything else."""
    return () if x is None else tuple(x) if isinstance(x, (list, tuple)) else None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class StepOutput:
    """New tokens of one request since its previous output.

    text: their text (stop strings cut, text that may begin a stop string held back until it cannot).
    logprobs: one dict per token, {"token_id", "logprob", "top": {id: logprob, ...} best first}, when the
    request asked for them. finish_reason: None while running, then "stop" | "length" | "cancelled".
    """

    token_ids: list[int]
    text: str
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
