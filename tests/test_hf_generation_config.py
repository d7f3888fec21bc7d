"""export-hf of a chat model writes generation_config.json, so transformers' generate stops at the end of a
turn; a model whose tokenizer has no chat template exports without one, as before."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.model.config import ModelConfig
from llmlab.model.hf import GENERATION_CONFIG, export_hf
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import Tokenizer

TEXTS = ["the cat sat on the mat and the dog ran far away home. " * 4, "def x = 1 and y = 2. " * 4]


def answers_end_of_turn(tok: Tokenizer) -> Transformer:
    """A tiny GPT-2-flavoured chat model whose greedy next token is always the end-of-turn token: the final
    LayerNorm outputs its bias (all ones) whatever the input, and only the end-of-turn row of the untied
    head is non-zero."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                                    block_size=64, tie_embeddings=False))
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.chat_template.end_of_turn_id] = 1.0
    return model


def save_checkpoint(model: Transformer, tok: Tokenizer, path):
    model.save(path)
    tok.save(path / "tokenizer")
    return path


@pytest.fixture(scope="module")
def chat_tok():
    return Tokenizer.train(TEXTS, vocab_size=300, progress=False, workers=1)


def test_chat_export_stops_transformers_generate_at_end_of_turn(chat_tok, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    chat = chat_tok.chat_template
    assert chat.stop_ids[0] == chat.end_of_turn_id != chat_tok.eos_id  # the case the file is for
    ckpt = save_checkpoint(answers_end_of_turn(chat_tok), chat_tok, tmp_path / "ckpt")
    export_hf(ckpt, tmp_path / "hf")

    written = json.loads((tmp_path / "hf" / GENERATION_CONFIG).read_text())
    assert written["eos_token_id"] == list(chat.stop_ids) == [chat.end_of_turn_id, chat_tok.eos_id]
    assert written["pad_token_id"] == chat.pad_id and written["bos_token_id"] == chat_tok.bos_id is not None
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == list(chat.stop_ids) and gen.pad_token_id == chat.pad_id

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.generation_config.eos_token_id == list(chat.stop_ids)
    prompt, _ = chat_tok.apply_chat_template([{"role": "user", "content": "the cat"}],
                                             add_generation_prompt=True)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompt):].tolist() == [chat.end_of_turn_id]  # stopped at the end of the turn


def test_export_without_chat_template_writes_no_generation_config(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.train(TEXTS, vocab_size=280, special_tokens=["<|eos|>"], progress=False, workers=1)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                                    block_size=64))
    export_hf(save_checkpoint(model, tok, tmp_path / "ckpt"), tmp_path / "hf")

    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.eos_token_id == tok.eos_id  # from config.json, as before
