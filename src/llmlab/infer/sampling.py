"""Turning logits into the next token: temperature, top-k, top-p (nucleus), greedy.

`probs_from_logits` is the one transform every sampler uses, so speculative decoding can apply exactly the
same one to the target's p and the draft's q (Leviathan et al. 2023 / Chen et al. 2023 need both under the
same transform for the output distribution to stay exact).

Order, as in Hugging Face's samplers: divide by the temperature, keep the top_k largest logits, then keep the
smallest set of most likely tokens whose probability mass reaches top_p (Holtzman et al. 2020). Temperature 0
means greedy: a one-hot distribution on the argmax (the first one on ties).
"""

from __future__ import annotations

import torch

from llmlab.errors import ConfigError


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """ConfigError for options no sampler accepts."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy, 1 = the model's "
                          "own distribution)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} must be a positive integer, or None to keep every token")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1], or None to keep every token")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """float32 logits [..., V] scaled by 1/temperature, dropped tokens at -inf (temperature must be > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A token is kept while the mass of the tokens ranked above it is still short of top_p; the most
        # likely token always is (mass_before = 0).
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution [..., V] (float32) after temperature / top-k / top-p; one-hot at
    temperature 0."""
    if temperature == 0:
        best = logits.argmax(-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, best, 1.0)
    return filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of probs [..., V] -> LongTensor [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of logits [..., V]; greedy (argmax) when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample(probs_from_logits(logits, temperature, top_k, top_p), generator)


def seeded_generator(seed: int | None, temperature: float, device) -> torch.Generator | None:
    """A private generator for sampling with `seed` (None when greedy or unseeded: the global RNG then), so
    the same seed gives the same tokens whatever else draws from torch's global RNG."""
    if seed is None or temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))
