"""Chat templates: ids and loss masks by hand, parity with transformers' apply_chat_template, storage in the
tokenizer directory, import-hf / export-hf round trips, with_chat_tokens and bad conversations."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab import ModelConfig, Tokenizer, Transformer
from llmlab.errors import TokenizerError
from llmlab.model.hf import export_hf, import_hf
from llmlab.tokenizer.chat import LLMLAB_CHAT_TOKENS, ChatFormat, hf_format, with_chat_tokens

CORPUS = ["Hello world, how are you today? I am fine, thank you. The answer is 4.",
          "What is two plus two? Two plus two is four. Reverse the word: drow.",
          "Système: soyez brefs. Ünïcödé 😀 works too."] * 8

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
# Qwen2.5-like: a default system prompt, and a tools block that must stay out when no tools are given.
QWEN = ("{%- if tools is not none %}{{- '<|im_start|>system\nTools.<|im_end|>\n' }}{%- endif %}"
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Meta's Llama 3 template (bos, header tokens, trimmed content, <|eot_id|>).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "fine, thank you"},
     {"role": "assistant", "content": "  The answer is 4.\n"}],
    [{"role": "system", "content": "Système: soyez brefs."}, {"role": "user", "content": "Ünïcödé 😀?"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320, progress=False)


def _hf_dir(tmp_path_factory, name: str, specials: list[str], template: str, **roles):
    """A local HF tokenizer directory (byte-level BPE trained by `tokenizers`) with a chat template."""
    from transformers import PreTrainedTokenizerFast

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **roles)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "qwen", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    return _hf_dir(tmp_path_factory, "llama3", specials, LLAMA3, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>")


def _hf_ids(path, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    return hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                  return_dict=False)


# ---- llmlab's template, by hand ---------------------------------------------------------------------------

def test_two_turn_ids_and_mask_by_hand(tok):
    s = tok.special_tokens
    sys_, user, asst, end = s["<|system|>"], s["<|user|>"], s["<|assistant|>"], s["<|end|>"]
    q1, a1, q2, a2 = (tok.encode(t) for t in ("Hello world", "Hello! How are you?", "fine", "four"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "fine"},
                {"role": "assistant", "content": "four"}]
    ids, mask = tok.apply_chat_template(messages)
    system = tok.encode("Be brief.")
    assert ids == [sys_, *system, end, user, *q1, end, asst, *a1, end, user, *q2, end, asst, *a2, end]
    assert mask == ([0] * (len(system) + 2) + [0] * (len(q1) + 3) + [1] * (len(a1) + 1)
                    + [0] * (len(q2) + 3) + [1] * (len(a2) + 1))
    prompt, prompt_mask = tok.apply_chat_template(messages[:4], add_generation_prompt=True)
    assert prompt == ids[:len(prompt)] and prompt[-1] == asst and prompt_mask == mask[:len(prompt)]


def test_end_of_turn_pad_and_stop_ids(tok):
    chat = tok.chat_template
    s = tok.special_tokens
    assert chat.source == "llmlab" and chat.end_of_turn_id == s["<|end|>"]
    assert chat.pad_id == s["<|pad|>"] and chat.pad_id != chat.end_of_turn_id
    assert chat.pad_id not in chat.stop_ids and chat.stop_ids == (s["<|end|>"], s["<|eos|>"])


def test_template_is_stored_in_the_tokenizer_directory(tok, tmp_path):
    tok.save(tmp_path / "t")
    stored = json.loads((tmp_path / "t" / "llmlab.json").read_text())["chat_template"]
    assert stored["source"] == "llmlab" and stored["end_of_turn"] == "<|end|>" and stored["pad"] == "<|pad|>"
    back = Tokenizer.load(tmp_path / "t")
    assert back.chat_format == tok.chat_format
    assert back.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])


def test_edited_stored_template_is_used(tok, tmp_path):
    """What llmlab.json stores is what renders (a checkpoint keeps the format it was trained with)."""
    tok.save(tmp_path / "t")
    data = json.loads((tmp_path / "t" / "llmlab.json").read_text())
    data["chat_template"]["template"] = data["chat_template"]["template"].replace("<|user|>", "<|user|>Q: ")
    (tmp_path / "t" / "llmlab.json").write_text(json.dumps(data))
    ids, _ = Tokenizer.load(tmp_path / "t").apply_chat_template(CONVERSATIONS[0])
    assert tok.decode(ids).startswith("<|user|>Q: What is two plus two?<|end|>")


# ---- parity with transformers -----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["chatml_dir", "qwen_dir", "llama3_dir"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_template_ids_equal_transformers(fixture, add_generation_prompt, request):
    path = request.getfixturevalue(fixture)
    ours = Tokenizer.from_hf(path)
    assert ours.chat_template.source == "hf"
    for messages in CONVERSATIONS:
        ids, mask = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ids == _hf_ids(path, messages, add_generation_prompt), messages
        assert len(mask) == len(ids)


def test_chatml_mask_and_end_of_turn(chatml_dir):
    ours = Tokenizer.from_hf(chatml_dir)
    s = ours.special_tokens
    chat = ours.chat_template
    assert (chat.end_of_turn_id, chat.stop_ids, chat.pad_id) == (s["<|im_end|>"], (s["<|im_end|>"],),
                                                                 s["<|endoftext|>"])
    ids, mask = ours.apply_chat_template(CONVERSATIONS[1])
    kept = [i for i, m in zip(ids, mask, strict=True) if m]
    # each reply and its <|im_end|>, not the newline ChatML writes after it
    assert ours.decode(kept) == "Hello! How are you?<|im_end|>  The answer is 4.\n<|im_end|>"


def test_llama3_mask_and_missing_pad(llama3_dir):
    ours = Tokenizer.from_hf(llama3_dir)
    chat = ours.chat_template
    assert chat.end_of_turn_id == ours.special_tokens["<|eot_id|>"] and chat.pad_id is None
    ids, mask = ours.apply_chat_template(CONVERSATIONS[1])
    kept = [i for i, m in zip(ids, mask, strict=True) if m]
    assert ours.decode(kept) == "Hello! How are you?<|eot_id|>The answer is 4.<|eot_id|>"  # trimmed
    tok2, added = with_chat_tokens(ours)
    assert added == ["<|pad|>"] and tok2.chat_template.pad_id == ours.vocab_size
    assert tok2.apply_chat_template(CONVERSATIONS[1]) == (ids, mask)


def test_generation_markers_give_transformers_assistant_mask(tok, tmp_path):
    """llmlab's template marks replies with {% generation %}, so transformers' return_assistant_tokens_mask
    (what TRL's assistant_only_loss reads) agrees with llmlab's mask."""
    from transformers import AutoTokenizer

    _export(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert (out["input_ids"], out["assistant_masks"]) == tok.apply_chat_template(messages)


# ---- import-hf / export-hf --------------------------------------------------------------------------------

def _export(tok, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=32)
    Transformer(cfg).save(ckpt)
    tok.save(ckpt / "tokenizer")
    export_hf(ckpt, tmp_path / "hf")


def test_export_hf_writes_llmlabs_template(tok, tmp_path):
    _export(tok, tmp_path)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template.template
    for messages in CONVERSATIONS:
        for agp in (False, True):
            assert _hf_ids(tmp_path / "hf", messages, agp) == tok.apply_chat_template(messages, agp)[0]


@pytest.mark.filterwarnings("ignore:.*names eos_token")  # llmlab's eos by name differs; the template's stops
def test_import_hf_keeps_the_models_template_and_export_writes_it_back(llama3_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=Tokenizer.from_hf(llama3_dir).vocab_size, hidden_size=32,
                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(src)
    for f in llama3_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    import_hf(src, tmp_path / "ckpt")
    imported = Tokenizer.load(tmp_path / "ckpt" / "tokenizer")
    assert imported.chat_format.source == "hf" and imported.chat_format.template == LLAMA3
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    for messages in CONVERSATIONS:
        assert _hf_ids(tmp_path / "out", messages, True) == _hf_ids(llama3_dir, messages, True)
        assert imported.apply_chat_template(messages, True)[0] == _hf_ids(llama3_dir, messages, True)


def test_template_without_an_end_of_turn_is_dropped_with_a_warning(tmp_path_factory):
    path = _hf_dir(tmp_path_factory, "plain", ["<|endoftext|>"],
                   "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.warns(UserWarning, match="chat template is not kept"):
        ours = Tokenizer.from_hf(path)
    assert ours.chat_format is None
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])


# ---- with_chat_tokens -------------------------------------------------------------------------------------

def test_with_chat_tokens_adds_llmlabs_tokens():
    base = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    tok2, added = with_chat_tokens(base)
    assert added == list(LLMLAB_CHAT_TOKENS)
    assert [tok2.special_tokens[t] for t in added] == list(range(base.vocab_size, base.vocab_size + 5))
    assert tok2.encode("Hello world") == base.encode("Hello world")
    ids, mask = tok2.apply_chat_template(CONVERSATIONS[0])
    assert tok2.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "four<|end|>"
    assert with_chat_tokens(tok2) == (tok2, [])


def test_with_chat_tokens_on_a_ready_tokenizer_adds_nothing(tok):
    tok2, added = with_chat_tokens(tok)
    assert added == [] and tok2.special_tokens == tok.special_tokens


# ---- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, fragment", [
    ([], "messages is empty"),
    ("hello", "must be a list"),
    ([{"role": "tool", "content": "x"}], "messages[0] has role 'tool'"),
    ([{"role": "user"}], "content of type NoneType"),
    ([{"role": "user", "content": ["a"]}], "content of type list"),
    (["hi"], "messages[0] is str"),
    ([{"role": "user", "content": "a<|end|>b"}], "special token '<|end|>'"),
])
def test_bad_messages_are_one_line_errors(tok, messages, fragment):
    with pytest.raises(TokenizerError) as e:
        tok.apply_chat_template(messages)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_template_that_is_not_append_only_needs_markers():
    base = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<|end|>"], progress=False)
    reversed_order = "{% for m in messages|reverse %}{{ m['content'] }}<|end|>{% endfor %}"
    chat = hf_format(reversed_order, {}, base.special_tokens)
    tok2 = Tokenizer.from_spec(dataclasses.replace(base.spec(), chat_format=chat))
    with pytest.raises(TokenizerError, match="append-only"):
        tok2.apply_chat_template(CONVERSATIONS[1])


def test_bad_stored_template_is_refused(tok, tmp_path):
    tok.save(tmp_path / "t")
    data = json.loads((tmp_path / "t" / "llmlab.json").read_text())
    data["chat_template"]["pad"] = "<|end|>"
    (tmp_path / "t" / "llmlab.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="pad '<|end|>' also ends a turn"):
        Tokenizer.load(tmp_path / "t")
    broken = ChatFormat("{% for %}", "hf", "<|end|>")
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        Tokenizer.from_spec(dataclasses.replace(tok.spec(), chat_format=broken))
