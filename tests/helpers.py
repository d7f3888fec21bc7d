"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmlab.cli import main
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import fingerprint, write_tokenizer_id


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


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm gains around 1, biases nonzero), so a mis-mapped tensor cannot hide in a
    parity test against another implementation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or "ln_" in name
            p.copy_(1.0 + 0.2 * noise if is_norm and name.endswith("weight") else 0.15 * noise)


def tiny_base_checkpoint(directory: Path) -> Path:
    """A tiny untrained 'pretrained' checkpoint at directory/ckpt whose tokenizer has no chat tokens (as a
    real base has): the start of the chat pipelines' tests."""
    torch.manual_seed(0)
    tok = Tokenizer.train(["a=1 b=2. What is a? Sort 3 1 2 and 4 5 6 7 8 9 0 " * 3], vocab_size=256 + 16 + 1,
                          progress=False, workers=1)
    path = directory / "ckpt"
    Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=64)).save(path)
    tok.save(path / "tokenizer")
    write_tokenizer_id(path, fingerprint(tok))
    return path


def hf_greedy(model, prompt: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy generate of n tokens after each (equal-length) prompt row, eos disabled."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out.tolist()


def assert_same_as_hf(ours, theirs, vocab: int, seq_len: int, prompt: list[list[int]],
                      new_tokens: int) -> None:
    """An llmlab model and a transformers model give the same fp32 logits (1e-4) and greedy tokens."""
    from llmlab.infer import generate

    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids)
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # meaningful logits, not all ~0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert generate(ours, prompt, new_tokens, temperature=0).tolist() == hf_greedy(theirs, prompt, new_tokens)


# ----- the affine-rule task shared by the distillation and draft-data tests -----
AFFINE_VOCAB = 64
AFFINE_PERM = np.random.default_rng(7).permutation(AFFINE_VOCAB)  # relabels a stream into another rule


def affine_shards(out, relabel=None, vocab: int = AFFINE_VOCAB, train_tokens: int = 12000):
    """Shards of the x -> (5x + 3) mod 64 stream (llmlab.data.synthetic.affine_stream), its tokens optionally
    relabelled by a permutation (a teacher trained on those continues any prompt with pi f pi^-1)."""
    from llmlab.data.shards import write_shard_dir
    from llmlab.data.synthetic import affine_stream

    streams = {"train": [affine_stream(train_tokens, AFFINE_VOCAB, 0)],
               "val": [affine_stream(2000, AFFINE_VOCAB, 2)]}
    if relabel is not None:
        streams = {k: [relabel[s] for s in v] for k, v in streams.items()}
    write_shard_dir(out, streams, vocab_size=vocab,
                    extra={"tokenizer": {"vocab_size": vocab, "eos_id": None}})
    return out


def affine_run_config(shards, root, *overrides):
    """A 60-step configs/tiny.toml pretraining run on `shards`, its runs under root/runs."""
    from llmlab.config import load_config
    from llmlab.train.pretrain import PretrainConfig

    base = [f"data.shards={shards}", f"train.out_dir={root / 'runs'}", "train.progress=false",
            "train.plot=false",
            "optim.max_steps=60", "optim.lr=1e-2", "train.eval_every=60", "train.ckpt_every=60"]
    return load_config(PretrainConfig, "configs/tiny.toml", base + list(overrides))


def affine_agreement(a_ckpt, b_ckpt) -> float:
    """Share of predictable positions (not the random token every 16th) where both models' argmaxes agree."""
    from llmlab.data.synthetic import affine_stream
    from llmlab.model import Transformer

    x = torch.from_numpy(affine_stream(33 * 16, AFFINE_VOCAB, 5)).reshape(16, 33)[:, :32]
    a, b = Transformer.load(a_ckpt), Transformer.load(b_ckpt)
    with torch.no_grad():
        agree = a(x).argmax(-1) == b(x).argmax(-1)
    keep = (torch.arange(32) + 1) % 16 != 0  # the next token is not the random one
    return agree[:, keep].float().mean().item()
