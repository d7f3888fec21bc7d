"""Tokenizers travelling with Hugging Face models: a tokenizer trained by the `tokenizers` library beside a
HF GPT-2 model is imported by load_hf / import-hf and encodes exactly as `tokenizers` and AutoTokenizer do,
and the imported checkpoint generates through `llmlab generate` the same greedy text as transformers; an
llmlab-trained tokenizer exported with save_hf loads in AutoTokenizer and encodes and decodes identically
both ways."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llmlab.cli import main  # noqa: E402
from llmlab.errors import TokenizerError  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.hf import hf_special_tokens, load_hf, save_hf  # noqa: E402
from llmlab.tokenizer import Tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "In 1905 Einstein published four papers. Their ideas changed physics for ever.\n",
    "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade, \u732b\u306f\u53ef\u611b\u3044 \U0001f600 emoji!\n",
] * 8
HELD_OUT = ["Hello world! The lazy fox returns: 42 papers, 3.14 ideas.\n\n   indented\ttabs",
            "na\u00efve \u732b \U0001f600 new words xylophone strawberry", "", " leading space", "a\r\nb"]


def hf_bpe_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE trained by the `tokenizers` library, GPT-2 style, with <|endoftext|> as special."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_with_tokenizer(tmp_path_factory):
    """A HF GPT-2 directory with a trained tokenizer.json and GPT-2's tokenizer_config.json layout."""
    directory = tmp_path_factory.mktemp("gpt2tok")
    tok = hf_bpe_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharp logits: greedy choices far from ties
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 64,
        "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<|endoftext|>"}))
    return directory, model, tok


def test_imported_tokenizer_encodes_like_tokenizers_and_autotokenizer(gpt2_with_tokenizer):
    directory, _, reference = gpt2_with_tokenizer
    _, tok = load_hf(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert tok.vocab_size == reference.get_vocab_size()
    assert tok.eos_id == reference.token_to_id("<|endoftext|>")
    for text in CORPUS[:4] + HELD_OUT:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids
        assert ids == auto(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert hf_special_tokens(directory) == {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}


def test_imported_checkpoint_generates_like_transformers(gpt2_with_tokenizer, tmp_path, capsys):
    """import-hf output is a normal checkpoint: `llmlab generate` (prompt after the eos document marker,
    greedy) writes exactly the text transformers' greedy generate makes from the same ids."""
    directory, model, reference = gpt2_with_tokenizer
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer" / "llmlab.json").is_file()
    capsys.readouterr()
    prompt = "The quick brown"
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "12", "--ignore-eos", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out
    eos = reference.token_to_id("<|endoftext|>")
    ids = torch.tensor([[eos] + reference.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=eos)
    assert ours == prompt + reference.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False) + "\n"


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_exported_tokenizer_round_trip(flavour, tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, progress=False)
    cfg = ModelConfig.preset(flavour, "tiny", vocab_size=tok.vocab_size)
    save_hf(Transformer(cfg).eval(), tmp_path / "hf", tokenizer=tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert auto.eos_token_id == tok.eos_id and auto.model_max_length == cfg.block_size
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.config.eos_token_id == tok.eos_id and theirs.config.bos_token_id == tok.bos_id
    _, back = load_hf(tmp_path / "hf")
    assert back.special_tokens == tok.special_tokens
    for text in HELD_OUT + ["<|user|> hi <|end|>"]:
        ids = tok.encode(text, allowed_special="all")
        assert auto(text)["input_ids"] == ids  # nothing added: no bos/eos post-processing
        assert back.encode(text, allowed_special="all") == ids
        assert auto.decode(ids) == tok.decode(ids) == text
    user = tok.special_tokens["<|user|>"]
    assert auto.decode([user, *tok.encode("hi")], skip_special_tokens=True) == "hi"


def test_eos_named_differently_in_tokenizer_config_warns(gpt2_with_tokenizer, tmp_path):
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(gpt2_with_tokenizer[0], directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": max(data["model"]["vocab"].values()) + 1, "content": "<|im_end|>",
                                 "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (directory / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    with pytest.warns(UserWarning, match="eos_token '<|im_end|>'"):
        load_hf(directory)


def test_unsupported_tokenizer_is_one_line_exit_2(gpt2_with_tokenizer, tmp_path, capsys):
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(gpt2_with_tokenizer[0], directory)
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(directory / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="WordPiece"):
        load_hf(directory)
    assert main(["import-hf", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WordPiece" in err and not (tmp_path / "out").exists()
    assert main(["import-hf", str(directory), str(tmp_path / "out"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "out" / "tokenizer").exists()
