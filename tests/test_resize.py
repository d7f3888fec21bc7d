"""grow_vocab and add_chat_tokens: old ids keep their logits, new rows are the mean, the model still saves and
loads, and a tokenizer without chat tokens gets them with one line saying so."""

from __future__ import annotations

import pytest
import torch

from llmlab import ModelConfig, Tokenizer, Transformer
from llmlab.errors import ModelError
from llmlab.model.resize import add_chat_tokens, grow_vocab
from llmlab.tokenizer.chat import LLMLAB_CHAT_TOKENS

CORPUS = ["Hello world, how are you today? The answer is four."] * 8


def _model(vocab: int, tie: bool, flavour: str = "gpt2") -> Transformer:
    torch.manual_seed(0)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False) if flavour == "llama" else {}
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, block_size=16,
                                   tie_embeddings=tie, **llama)).eval()


@pytest.mark.parametrize("tie, flavour", [(True, "gpt2"), (False, "gpt2"), (False, "llama")])
def test_grow_vocab_keeps_old_logits_and_sets_new_rows_to_the_mean(tie, flavour, tmp_path):
    model = _model(100, tie, flavour)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    emb_mean, head_mean = model.tok_emb.weight.mean(0), model.lm_head.weight.mean(0)
    with torch.no_grad():
        before = model(ids)
    assert grow_vocab(model, 104) is model
    assert model.config.vocab_size == 104 and model.tok_emb.weight.shape == (104, 32)
    assert model.lm_head.weight.shape == (104, 32) and (model.lm_head.weight is model.tok_emb.weight) == tie
    torch.testing.assert_close(model.tok_emb.weight[100:], emb_mean.expand(4, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.lm_head.weight[100:], head_mean.expand(4, -1), rtol=0, atol=1e-7)
    with torch.no_grad():
        after = model(ids)
    assert after.shape == (2, 12, 104)
    assert torch.equal(after[..., :100], before)
    # the new token's logit is the mean of the old logits (Hewitt 2021)
    torch.testing.assert_close(after[..., 100], before.mean(-1), rtol=0, atol=1e-5)
    model.save(tmp_path / "m")
    loaded = Transformer.load(tmp_path / "m")
    assert loaded.config.vocab_size == 104
    with torch.no_grad():
        assert torch.equal(loaded(ids), after)


def test_grown_model_trains_the_new_rows():
    model = _model(50, tie=True).train()
    grow_vocab(model, 52)
    loss = model(torch.tensor([[1, 2, 50]])).logsumexp(-1).sum()
    loss.backward()
    assert model.tok_emb.weight.grad.shape == (52, 32) and model.tok_emb.weight.grad[50].abs().sum() > 0


def test_grow_vocab_refuses_shrinking():
    with pytest.raises(ModelError, match="can only grow"):
        grow_vocab(_model(50, tie=True), 40)


def test_add_chat_tokens_grows_tokenizer_and_model_with_one_line():
    tok = Tokenizer.train(CORPUS, vocab_size=290, special_tokens=["<|endoftext|>"], progress=False)
    model = _model(tok.vocab_size, tie=False)
    mean = model.tok_emb.weight.mean(0)
    model, tok2, message = add_chat_tokens(model, tok)
    v = tok.vocab_size + len(LLMLAB_CHAT_TOKENS)
    assert message == (f"added 5 chat tokens to the tokenizer ({', '.join(LLMLAB_CHAT_TOKENS)}); grew the "
                       f"embedding to {v} rows")
    assert tok2.vocab_size == model.config.vocab_size == v
    torch.testing.assert_close(model.tok_emb.weight[tok.vocab_size:], mean.expand(5, -1), rtol=0, atol=1e-7)
    ids, mask = tok2.apply_chat_template([{"role": "user", "content": "Hello"},
                                          {"role": "assistant", "content": "four"}])
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), v)
    again = add_chat_tokens(model, tok2)
    assert again[1] is tok2 and again[2] is None and again[0].config.vocab_size == v


def test_add_chat_tokens_uses_padding_rows_of_a_padded_vocabulary():
    tok = Tokenizer.train(CORPUS, vocab_size=290, special_tokens=["<|endoftext|>"], progress=False)
    model = _model(tok.vocab_size + 10, tie=True)  # padded like many HF models
    mean = model.tok_emb.weight[:tok.vocab_size].mean(0)
    model, tok2, message = add_chat_tokens(model, tok)
    assert model.config.vocab_size == tok.vocab_size + 10
    rows = tok.vocab_size + 10
    assert message.endswith(f"their rows in the model's padded {rows}-row embedding set to the mean")
    torch.testing.assert_close(model.tok_emb.weight[tok.vocab_size:tok2.vocab_size], mean.expand(5, -1),
                               rtol=0, atol=1e-7)


def test_add_chat_tokens_on_a_ready_tokenizer_changes_nothing():
    tok = Tokenizer.train(CORPUS, vocab_size=290, progress=False)  # default specials: chat tokens included
    model = _model(tok.vocab_size, tie=True)
    weight = model.tok_emb.weight.clone()
    model, tok2, message = add_chat_tokens(model, tok)
    assert message is None and tok2.vocab_size == tok.vocab_size and torch.equal(model.tok_emb.weight, weight)
