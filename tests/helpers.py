"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from llmlab.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `llmlab ARGV...` in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """The CLI rule for user errors: exit code 2 and exactly one `llmlab: error:` line naming the problem."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmlab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def hf_greedy(model, prompt: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy generate of n tokens after each (equal-length) prompt row, eos disabled."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out.tolist()


def assert_same_as_hf(ours, theirs, vocab: int, seq_len: int, prompt: list[list[int]], new_tokens: int) -> None:
    """An llmlab model and a transformers model give the same fp32 logits (1e-4) and greedy tokens."""
    from llmlab.infer import generate

    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids)
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # meaningful logits, not all ~0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert generate(ours, prompt, new_tokens, temperature=0).tolist() == hf_greedy(theirs, prompt, new_tokens)
