"""Argument types shared by the verbs: numbers checked for range when the command line is parsed, so that
`--workers -3` or `--temperature inf` is one line naming the option before anything is loaded."""

from __future__ import annotations

import argparse
import math


def whole(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {_span(low, high)}")
        return value

    return parse


def real(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the interval from low to high (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; give a finite number "
                                             f"{_interval(low, high, low_open, high_open)}")
        return value

    return parse


def _span(low: int, high: int | None) -> str:
    return f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"


def _interval(low: float, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


COUNT = whole(1)            # sizes, counts, workers, steps: at least one
SEED = whole(0, 2**63 - 1)  # numpy and torch seeds are non-negative 64-bit integers
TEMPERATURE = real(0.0)     # 0 = greedy
