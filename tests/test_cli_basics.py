"""The CLI entry points exist and report user errors as one line with exit code 2."""

import subprocess
import sys

from llmlab import __version__
from llmlab.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out


def test_python_m_llmlab_runs():
    out = subprocess.run([sys.executable, "-m", "llmlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"llmlab {__version__}"


def test_device_names_resolve_or_fail_in_one_line(monkeypatch, tmp_path, capsys):
    import pytest
    import torch

    from llmlab.device import resolve_device, resolve_dtype
    from llmlab.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type in ("cpu", "mps")
    for bad, match in (("cuda", "no CUDA device"), ("cuda:3", "no CUDA device"),
                       ("tpu", "not a device torch knows")):
        with pytest.raises(ConfigError, match=match):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\) here; use cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a command asked for a missing GPU: one line, exit 2, before anything is loaded
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "a", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and err.count("\n") == 1


def test_overrides_may_stand_anywhere_among_the_options(capsys):
    import tomllib

    argv = ["pretrain", "data.shards=somewhere", "--config", "tiny", "train.run_name=x", "--print-config",
            "optim.lr=0.01"]
    assert main(argv) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert (cfg["data"]["shards"], cfg["train"]["run_name"], cfg["optim"]["lr"]) == ("somewhere", "x", 0.01)


def test_argparse_errors_are_one_line_and_a_hint(capsys):
    for argv, first in [
        (["pretrain", "--config", "tiny", "--bogus"],
         "llmlab pretrain: error: unrecognized argument: --bogus"),
        (["pretrain", "--config", "tiny", "stray"], "override 'stray' is not key=value"),
        (["tokenizer"], "llmlab tokenizer: error: missing ACTION; choose one of: train, encode"),
        (["data", "prepare", "x", "--out", "o"], "the following arguments are required: --tokenizer"),
    ]:
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert captured.out == "" and first in lines[0] and "usage:" not in captured.err
        assert len(lines) == 1 or lines[1] == f"llmlab: see '{lines[0].split(': error')[0]} --help'"


def _all_parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def test_every_numeric_option_is_range_checked():
    """No option takes a bare int/float (which lets --workers -3 or --temperature inf through), except
    --bits, whose values the quantizer names itself."""
    from llmlab.cli import build_parser

    bare = [f"{p.prog} {a.option_strings[0]}" for p in _all_parsers(build_parser()) for a in p._actions
            if a.type in (int, float) and a.option_strings != ["--bits"]]
    assert bare == []


def test_range_checked_types_accept_exactly_their_range():
    import argparse
    import math

    from hypothesis import given
    from hypothesis import strategies as st

    from llmlab.cli.options import COUNT, TEMPERATURE, real

    top_p = real(0.0, 1.0, low_open=True)
    words = st.one_of(st.integers(-10, 10**6).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=6))

    @given(words)
    def check(text):
        for parse, ok in ((COUNT, lambda v: isinstance(v, int) and v >= 1),
                          (TEMPERATURE, lambda v: math.isfinite(v) and v >= 0),
                          (top_p, lambda v: math.isfinite(v) and 0 < v <= 1)):
            try:
                value = parse(text)
            except argparse.ArgumentTypeError as e:
                assert "\n" not in str(e)
            else:
                assert ok(value), (text, value)

    check()
