"""Hugging Face interop, checked against transformers itself: tiny random HF models (GPT-2, Llama with GQA
tied and untied, Qwen2 with q/k/v biases, Mistral without a sliding window) saved as safetensors, sharded
safetensors and pytorch_model.bin are imported and must give the same logits (1e-4, fp32) and the same greedy
tokens; llmlab models exported with save_hf must do the same inside transformers; bad directories fail with
one clear line."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import assert_same_as_hf, randomize  # noqa: E402
from llmlab.cli import main  # noqa: E402
from llmlab.errors import CheckpointError, ModelError  # noqa: E402
from llmlab.infer import generate  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.hf import load_hf, save_hf  # noqa: E402

V, T = 96, 12
PROMPT = [[5, 17, 3, 88, 41, 9, 60, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
LLAMA_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None)


def hf_models() -> dict:
    """name -> (config class name, kwargs, how save_pretrained writes it)."""
    return {
        "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    bos_token_id=None, eos_token_id=None), {}),
        "llama-gqa-untied": ("LlamaConfig", dict(LLAMA_SHAPE, num_key_value_heads=2,
                                                 tie_word_embeddings=False, rope_theta=50000.0),
                             {"max_shard_size": "20KB"}),
        "llama-tied-smollm": ("LlamaConfig", dict(LLAMA_SHAPE, num_key_value_heads=1,
                                                  tie_word_embeddings=True), {"bin": True}),
        "qwen2-bias": ("Qwen2Config", dict(LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=True), {}),
        "mistral": ("MistralConfig", dict(LLAMA_SHAPE, num_key_value_heads=2, sliding_window=None), {}),
    }


def make_hf(name: str, directory):
    cls_name, kwargs, save_kwargs = hf_models()[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    if save_kwargs.get("bin"):  # transformers 5 only writes safetensors; 4.x wrote this (tied copy included)
        config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, make_hf(name, root / name)) for name in hf_models()}


# ----- import -----

@pytest.mark.parametrize("name", list(hf_models()))
def test_import_matches_transformers(hf_dirs, name):
    directory, reference = hf_dirs[name]
    model, tok = load_hf(directory)
    assert tok is None  # no tokenizer.json was saved
    assert isinstance(model, Transformer) and not model.training
    assert model.tok_emb.weight.dtype == torch.float32
    cfg = model.config
    if name == "llama-tied-smollm":
        assert cfg.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    if name == "qwen2-bias":
        assert cfg.attn_bias and not cfg.bias and model.blocks[0].attn.proj.bias is None
    if name == "llama-gqa-untied":
        assert cfg.kv_heads == 2 and cfg.rope_theta == 50000.0 and not cfg.tie_embeddings
        assert (directory / "model.safetensors.index.json").is_file()  # really sharded
    assert_same_as_hf(model, reference, V, T, PROMPT, 16)


def test_sharded_pytorch_bin_loads(hf_dirs, tmp_path):
    directory, reference = hf_dirs["gpt2"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    state = reference.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_hf(tmp_path)
    assert_same_as_hf(model, reference, V, T, PROMPT, 16)


def test_unprefixed_gpt2_with_mask_buffers_loads(hf_dirs, tmp_path):
    """The original GPT-2 files have no 'transformer.' prefix and carry the causal-mask buffers attn.bias."""
    from safetensors.torch import load_file, save_file

    directory, reference = hf_dirs["gpt2"]
    state = {k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model, _ = load_hf(tmp_path)
    assert_same_as_hf(model, reference, V, T, PROMPT, 16)


def test_dtype_kept_or_converted(hf_dirs, tmp_path):
    directory, reference = hf_dirs["qwen2-bias"]
    reference.to(torch.float16).save_pretrained(tmp_path)
    reference.float()
    model, _ = load_hf(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.rope_cos.dtype == torch.float16
    model, _ = load_hf(directory, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_hf(tmp_path, dtype=torch.float32)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():  # fp16 weights upcast: close to the fp32 reference
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=5e-2, rtol=0)


def test_no_meta_tensors_and_params_not_duplicated(hf_dirs):
    model, _ = load_hf(hf_dirs["llama-gqa-untied"][0])
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert model.num_params() == sum(p.numel() for p in hf_dirs["llama-gqa-untied"][1].parameters())


# ----- export -----

EXPORTS = {
    "gpt2": ModelConfig.preset("gpt2", "tiny", vocab_size=V),
    "gpt2-untied-ff": ModelConfig.preset("gpt2", "tiny", vocab_size=V, tie_embeddings=False, d_ff=96),
    "llama-gqa": ModelConfig.preset("llama", "tiny", vocab_size=V, n_kv_head=2, rope_theta=20000.0),
    "llama-tied": ModelConfig.preset("llama", "tiny", vocab_size=V, tie_embeddings=True),
    "qwen2": ModelConfig.preset("llama", "tiny", vocab_size=V, n_kv_head=1, qkv_bias=True),
    "llama-bias": ModelConfig.preset("llama", "tiny", vocab_size=V, bias=True),
}
EXPECTED_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt2-untied-ff": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers(name, tmp_path):
    torch.manual_seed(0)
    model = Transformer(EXPORTS[name]).eval()
    randomize(model)
    save_hf(model, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == EXPECTED_CLASS.get(name, "LlamaForCausalLM")
    assert theirs.dtype == torch.float32
    assert_same_as_hf(model, theirs, V, T, PROMPT, 16)
    back, _ = load_hf(tmp_path / "hf")  # and the round trip is exact
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_export_bf16_keeps_dtype(tmp_path):
    model = Transformer(EXPORTS["llama-gqa"]).to(torch.bfloat16)
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs.model.layers[1].self_attn.k_proj.weight,
                       model.blocks[1].attn.qkv.weight[64:96])


@pytest.mark.parametrize("overrides, word", [
    (dict(position="rope"), "position='rope'"),  # gpt2 preset with rope: no HF architecture
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(n_kv_head=2), "grouped-query"),
])
def test_export_refuses_hybrids(overrides, word, tmp_path):
    model = Transformer(ModelConfig.preset("gpt2", "tiny", **overrides))
    with pytest.raises(ModelError, match=word):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- CLI -----

def test_cli_import_then_export_round_trip(hf_dirs, tmp_path, capsys):
    directory, reference = hf_dirs["llama-gqa-untied"]
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 0
    assert "imported llama model" in capsys.readouterr().out
    model = Transformer.load(tmp_path / "ckpt")
    assert_same_as_hf(model, reference, V, T, PROMPT, 16)
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs.lm_head.weight, reference.lm_head.weight.bfloat16())


# ----- bad input -----

def edited_config(src, dst, **changes):
    """A copy of the HF directory src with config.json keys changed (None deletes the key)."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, changes, error, words", [
    ("llama-gqa-untied", dict(model_type="mixtral"), ModelError, "mixture-of-experts"),
    ("llama-gqa-untied", dict(model_type="bert"), ModelError, "unknown model_type 'bert'"),
    ("llama-gqa-untied", dict(model_type=None), CheckpointError, "no 'model_type'"),
    ("llama-gqa-untied", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     ModelError, "lacks 'low_freq_factor'"),  # llama3 scaling is supported, but needs all its keys
    ("llama-gqa-untied",
     dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2}),
     ModelError, "rope_scaling.rope_type='linear'"),
    ("llama-gqa-untied", dict(hidden_act="gelu"), ModelError, "hidden_act='gelu'"),
    ("llama-gqa-untied", dict(head_dim=16), ModelError, "head_dim=16"),
    ("llama-gqa-untied", dict(attention_bias=True), ModelError, "attention_bias=True"),
    ("llama-gqa-untied", dict(num_local_experts=8), ModelError, "num_local_experts"),
    ("mistral", dict(sliding_window=16), ModelError, "sliding_window=16"),
    ("qwen2-bias", dict(layer_types=["full_attention", "sliding_attention"]), ModelError,
     "sliding_attention"),
    ("gpt2", dict(activation_function="relu"), ModelError, "activation_function='relu'"),
    ("gpt2", dict(n_head=5), ModelError, "n_head"),
    ("llama-gqa-untied", dict(hidden_size=None), CheckpointError, "'hidden_size'"),
])
def test_unsupported_configs_are_refused(hf_dirs, tmp_path, name, changes, error, words):
    directory = edited_config(hf_dirs[name][0], tmp_path / "m", **changes)
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_hf(directory)


def test_sliding_window_not_shorter_than_context_is_accepted(hf_dirs, tmp_path):
    directory = edited_config(hf_dirs["mistral"][0], tmp_path / "m", sliding_window=64)
    assert_same_as_hf(load_hf(directory)[0], hf_dirs["mistral"][1], V, T, PROMPT, 16)


def test_tensor_problems_name_the_tensor_and_shape(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = hf_dirs["qwen2-bias"][0]
    state = load_file(src / "model.safetensors")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"},
                    r"lacks tensor 'model.layers.1.self_attn.k_proj.bias' \(expected shape \(16,\)\)"),
        "shape": ({**state, "model.layers.0.mlp.up_proj.weight": torch.zeros(81, 32)},
                  r"'model.layers.0.mlp.up_proj.weight' has shape \(81, 32\) "
                  r"but config.json implies \(80, 32\)"),
        "extra": ({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)},
                  r"'model.layers.0.self_attn.q_norm.weight' \(1 unexpected"),
    }
    for case, (tensors, words) in cases.items():
        directory = edited_config(src, tmp_path / case)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=words):
            load_hf(directory)


def test_missing_files(hf_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    directory = edited_config(hf_dirs["gpt2"][0], tmp_path / "noweights")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_hf(directory)
    directory = edited_config(hf_dirs["llama-gqa-untied"][0], tmp_path / "shard")
    next(directory.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of"):
        load_hf(directory)
    directory = edited_config(hf_dirs["gpt2"][0], tmp_path / "corrupt")
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf(directory)


class Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse to build it."""


def test_pickle_with_objects_is_refused(hf_dirs, tmp_path):
    directory = edited_config(hf_dirs["llama-tied-smollm"][0], tmp_path / "m")
    assert not (directory / "model.safetensors").exists()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": Payload()},
               directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_hf(directory)


def test_cli_bad_input_is_one_line_exit_2(hf_dirs, tmp_path, capsys):
    directory = edited_config(hf_dirs["gpt2"][0], tmp_path / "m", model_type="t5")
    assert main(["import-hf", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model_type 't5'" in err
    assert not (tmp_path / "out").exists()
    assert main(["export-hf", str(tmp_path / "nockpt"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["import-hf", str(directory), str(directory)]) == 2  # would replace its own input
    assert "is the input directory" in capsys.readouterr().err and (directory / "config.json").is_file()


def test_export_refuses_a_modified_model(tmp_path):
    model = Transformer(EXPORTS["llama-gqa"])
    model.blocks[0].attn.qkv.register_buffer("scale", torch.ones(3))  # stands in for a quantized linear
    with pytest.raises(ModelError, match="blocks.0.attn.qkv.scale"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_model_quantizes_and_generates(hf_dirs):
    """An imported model is a plain Transformer: later stages (here int8 RTN + generate) take it as is."""
    from llmlab.infer.quant import quantize

    model, _ = load_hf(hf_dirs["qwen2-bias"][0])
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        before = model(ids)
    quantize(model, "rtn", bits=8, progress=False)
    assert type(model.blocks[0].attn.qkv).__name__ == "QuantLinear"
    with torch.no_grad():
        after = model(ids)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert generate(model, PROMPT, 8, temperature=0).shape == (2, 16)
