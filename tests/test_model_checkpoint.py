"""Checkpoints: config.json + model.safetensors round trip bitwise; broken or mismatched ones fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlab.errors import CheckpointError
from llmlab.model import ModelConfig, Transformer


def make(flavour: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(flavour, "tiny", **kw)).eval()


@pytest.mark.parametrize("flavour,kw", [("gpt2", {}), ("llama", {"n_kv_head": 2}),
                                        ("gpt2", {"tie_embeddings": False})])
def test_round_trip_gives_bitwise_identical_logits(tmp_path, flavour, kw):
    model = make(flavour, **kw)
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    loaded = Transformer.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings


def test_loaded_tied_model_keeps_training_tied(tmp_path):
    make("gpt2").save(tmp_path / "ckpt")
    model = Transformer.load(tmp_path / "ckpt").train()
    assert model.num_params() == make("gpt2").num_params()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    opt.step()
    assert model.lm_head.weight is model.tok_emb.weight


def test_load_in_another_dtype(tmp_path):
    make("llama").save(tmp_path / "ckpt")
    model = Transformer.load(tmp_path / "ckpt", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.bfloat16
    assert model(torch.randint(0, 256, (1, 5))).dtype == torch.bfloat16


def test_save_replaces_an_existing_checkpoint(tmp_path):
    make("gpt2").save(tmp_path / "ckpt")
    other = make("gpt2", n_layer=3)
    other.save(tmp_path / "ckpt")
    assert Transformer.load(tmp_path / "ckpt").config.n_layer == 3


def test_missing_directory_or_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope does not exist"):
        Transformer.load(tmp_path / "nope")
    make("gpt2").save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        Transformer.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        Transformer.load(tmp_path / "ckpt")


def test_config_that_does_not_fit_the_weights_names_the_tensor(tmp_path):
    make("gpt2").save(tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "d_model": 128}))
    with pytest.raises(CheckpointError, match=r"'tok_emb.weight' has shape \(256, 64\).*\(256, 128\)"):
        Transformer.load(tmp_path / "ckpt")
    cfg_file.write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'blocks.2.attn_norm.weight'"):
        Transformer.load(tmp_path / "ckpt")
    cfg_file.write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(CheckpointError, match=r"has tensor 'blocks.1.*does not use"):
        Transformer.load(tmp_path / "ckpt")
    cfg_file.write_text(json.dumps({**cfg, "n_layers": 2}))
    with pytest.raises(CheckpointError, match=r"config.json.*did you mean 'n_layer'"):
        Transformer.load(tmp_path / "ckpt")
    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        Transformer.load(tmp_path / "ckpt")


def test_corrupt_weights_file_is_named(tmp_path):
    make("gpt2").save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        Transformer.load(tmp_path / "ckpt")


def test_a_duplicated_tied_head_in_the_file_is_accepted(tmp_path):
    """Writers that keep both names (e.g. converters) still load; the head stays tied to the embedding."""
    model = make("gpt2")
    model.save(tmp_path / "ckpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    loaded = Transformer.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.tok_emb.weight
