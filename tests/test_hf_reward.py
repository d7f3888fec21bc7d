"""Reward models (scalar head) through Hugging Face: save_hf writes GPT2/Llama/Qwen2ForSequenceClassification
with one label and the tokenizer's pad id, and transformers' AutoModelForSequenceClassification scores ragged
right-padded batches as llmlab does at each sequence's last real token (1e-5, fp32); HF sequence classifiers
with one label import as head="scalar"; save -> load is exact; the CLI verbs move reward checkpoints both
ways; an export transformers could not score padded batches with is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import randomize  # noqa: E402
from llmlab.cli import main  # noqa: E402
from llmlab.errors import ModelError  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.hf import load_hf, save_hf  # noqa: E402
from llmlab.tokenizer import Tokenizer  # noqa: E402

TEXT = " ".join(f"w{i * 7919 % 1000} cat{i % 13} sat on mat{i % 7}" for i in range(600))
LENGTHS = [9, 4, 12, 1]  # a ragged batch, right-padded to the longest
EXPORTS = {  # name -> (preset flavour, overrides, the class transformers builds)
    "gpt2": ("gpt2", {}, "GPT2ForSequenceClassification"),
    "llama-gqa": ("llama", dict(n_kv_head=2), "LlamaForSequenceClassification"),
    "qwen2": ("llama", dict(n_kv_head=1, qkv_bias=True), "Qwen2ForSequenceClassification"),
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300, progress=False, workers=1)


def reward_model(name: str, vocab_size: int) -> Transformer:
    flavour, overrides, _ = EXPORTS[name]
    model = Transformer(ModelConfig.preset(flavour, "tiny", vocab_size=vocab_size, head="scalar",
                                           dropout=0.0, **overrides)).eval()
    randomize(model)
    return model


def ragged_batch(pad_id: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, max(LENGTHS)] right-padded with pad_id (real tokens never pad_id), and the attention mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((len(LENGTHS), max(LENGTHS)), pad_id)
    for row, n in enumerate(LENGTHS):
        real = torch.randint(0, vocab - 1, (n,), generator=g)
        ids[row, :n] = torch.where(real >= pad_id, real + 1, real)  # skip the pad id
    return ids, (ids != pad_id).long()


def llmlab_last_token_scores(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """[B] llmlab's score at each row's last real token (rows of LENGTHS real tokens)."""
    with torch.no_grad():
        scores = model.scores(ids)
    return scores[torch.arange(len(LENGTHS)), torch.tensor(LENGTHS) - 1]


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_scores_like_transformers(name, tok, tmp_path):
    model = reward_model(name, tok.vocab_size)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [EXPORTS[name][2]] and config["pad_token_id"] == tok.pad_id
    assert not (tmp_path / "hf" / "generation_config.json").exists()  # a reward model does not generate
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == EXPORTS[name][2] and theirs.config.num_labels == 1
    assert theirs.score.bias is None and torch.equal(theirs.score.weight, model.score.weight)
    ids, mask = ragged_batch(tok.pad_id, tok.vocab_size)
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (len(LENGTHS), 1)
    ours = llmlab_last_token_scores(model, ids)
    torch.testing.assert_close(logits[:, 0], ours, rtol=0, atol=1e-5)
    alone = torch.stack([model.scores(ids[i:i + 1, :n])[0, -1] for i, n in enumerate(LENGTHS)]).detach()
    torch.testing.assert_close(ours, alone, rtol=0, atol=1e-5)  # padding changes no real token's score


@pytest.mark.parametrize("name", list(EXPORTS))
def test_save_load_round_trip_is_exact(name, tok, tmp_path):
    model = reward_model(name, tok.vocab_size)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    back, back_tok = load_hf(tmp_path / "hf")
    resolved = [dataclasses.replace(m.config, d_ff=m.config.ffn_dim) for m in (back, model)]
    assert resolved[0] == resolved[1] and back.config.head == "scalar" and not hasattr(back, "lm_head")
    assert back_tok.pad_id == tok.pad_id
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", ["GPT2", "Llama"])
def test_hf_reward_model_imports_with_a_scalar_head(family, tmp_path):
    vocab, pad = 64, 0
    shape = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64) if family == "GPT2" else \
        dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
    config = getattr(transformers, f"{family}Config")(vocab_size=vocab, num_labels=1, pad_token_id=pad,
                                                      bos_token_id=None, eos_token_id=None, **shape)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    assert model.config.head == "scalar"
    ids, mask = ragged_batch(pad, vocab)
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(llmlab_last_token_scores(model, ids), logits, rtol=0, atol=1e-5)


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                     num_labels=3, pad_token_id=0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ModelError, match="num_labels=3") as err:
        load_hf(tmp_path / "hf")
    assert "\n" not in str(err.value)


def test_export_without_a_pad_token_is_refused(tok, tmp_path):
    model = reward_model("gpt2", tok.vocab_size)
    with pytest.raises(ModelError, match="without a tokenizer") as err:
        save_hf(model, tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()
    no_pad = Tokenizer.train([TEXT], vocab_size=280, special_tokens=["<|eos|>"], progress=False, workers=1)
    with pytest.raises(ModelError, match="no padding token"):
        save_hf(reward_model("gpt2", no_pad.vocab_size), tmp_path / "hf", tokenizer=no_pad)
    assert not (tmp_path / "hf").exists()


def test_cli_exports_and_imports_a_reward_checkpoint(tok, tmp_path, capsys):
    model = reward_model("llama-gqa", tok.vocab_size)
    model.save(tmp_path / "rm")
    tok.save(tmp_path / "rm" / "tokenizer")
    assert main(["export-hf", str(tmp_path / "rm"), str(tmp_path / "hf")]) == 0
    assert "exported llama reward model" in capsys.readouterr().out
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ids, mask = ragged_batch(tok.pad_id, tok.vocab_size)
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(logits, llmlab_last_token_scores(model, ids), rtol=0, atol=1e-5)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "imported llama reward model" in capsys.readouterr().out
    back = Transformer.load(tmp_path / "back")
    assert back.config.head == "scalar" and torch.equal(back.score.weight, model.score.weight)
    assert main(["export-hf", str(tmp_path / "rm"), str(tmp_path / "bare"), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--no-tokenizer" in err and not (tmp_path / "bare").exists()
