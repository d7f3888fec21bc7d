"""Llama 3.1/3.2 "llama3" RoPE scaling, checked against transformers and the NumPy reference.

The tiny models use head_dim 16, rope_theta 1e4 and original_max_position_embeddings 32 with factor 8, low
1, high 4, so the eight rotary frequencies fall in all three ranges of the adjustment (kept, blended, divided
by 8), and every comparison runs past position 32, where scaled and plain RoPE disagree most."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import assert_same_as_hf, randomize  # noqa: E402
from llmlab.cli import main  # noqa: E402
from llmlab.config import load_config, to_toml  # noqa: E402
from llmlab.errors import ModelError  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.hf import load_hf, save_hf  # noqa: E402
from llmlab.model.numpy_ref import forward as numpy_forward  # noqa: E402
from llmlab.model.numpy_ref import llama3_scale, numpy_weights  # noqa: E402
from llmlab.model.transformer import rope_inv_freq  # noqa: E402

V, T, ORIGINAL = 96, 48, 32
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL}
PROMPT = [[5, 17, 3, 88, 41, 9, 60, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
NEW = T - len(PROMPT[0])  # generation runs to position 48 > 32


@pytest.fixture(scope="module")
def hf_llama3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "llama3"
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rope_scaling=dict(SCALING),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    model.save_pretrained(directory)
    return directory, model


def test_tiny_config_hits_all_three_frequency_ranges():
    cfg = ModelConfig.preset("llama", "tiny", rope_scaling=dict(SCALING))
    plain = rope_inv_freq(ModelConfig.preset("llama", "tiny"))
    ratio = (rope_inv_freq(cfg) / plain).tolist()
    assert ratio[0] == 1.0  # wavelength 6.3 < 32/4: kept
    assert 1 / 8 < ratio[1] < 1  # wavelength 19.9 between 8 and 32: blended
    # smooth = (32/19.87 - 1) / 3 = 0.2035 -> 0.7965/8 + 0.2035
    assert ratio[1] == pytest.approx((1 - (ORIGINAL / (2 * np.pi * 10 ** 0.5) - 1) / 3) / 8
                                     + (ORIGINAL / (2 * np.pi * 10 ** 0.5) - 1) / 3, rel=1e-6)
    assert ratio[2:] == pytest.approx([1 / 8] * 6, rel=1e-6)  # wavelengths >= 62.8 > 32: divided by factor


def test_import_matches_transformers_past_original_context(hf_llama3):
    directory, reference = hf_llama3
    saved = json.loads((directory / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3"  # the transformers 5 form
    model, _ = load_hf(directory)
    assert model.config.rope_scaling == SCALING and model.config.rope_theta == 10000.0
    assert_same_as_hf(model, reference, V, T, PROMPT, NEW)
    plain = Transformer(ModelConfig(**{**vars(model.config), "rope_scaling": None})).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor(PROMPT)
    with torch.no_grad():  # the scaling really changes the computation
        assert (plain(ids) - model(ids)).abs().max() > 1e-3


def test_import_transformers4_rope_scaling_form(hf_llama3, tmp_path):
    import shutil

    directory, reference = hf_llama3
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    # as Llama-3.2-1B's config.json: rope_theta + rope_scaling with integer-ish values
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=10000.0, rope_scaling={"factor": 8, "high_freq_factor": 4.0, "low_freq_factor": 1,
                                                 "original_max_position_embeddings": ORIGINAL,
                                                 "rope_type": "llama3"})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model, _ = load_hf(tmp_path / "m")
    assert model.config.rope_scaling == SCALING
    assert_same_as_hf(model, reference, V, T, PROMPT, NEW)


def test_export_reloads_identically_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama", "tiny", vocab_size=V, n_kv_head=2,
                                           rope_scaling=dict(SCALING))).eval()
    randomize(model)
    save_hf(model, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    params = theirs.config.rope_parameters
    assert {k: params[k] for k in SCALING} == SCALING and params["rope_theta"] == 10000.0
    assert_same_as_hf(model, theirs, V, T, PROMPT, NEW)
    back, _ = load_hf(tmp_path / "hf")
    assert back.config.rope_scaling == SCALING and back.config.rope_theta == model.config.rope_theta
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_cli_import_keeps_scaling_in_checkpoint_and_toml(hf_llama3, tmp_path, capsys):
    directory, reference = hf_llama3
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 0
    model = Transformer.load(tmp_path / "ckpt")
    assert model.config.rope_scaling == SCALING
    assert_same_as_hf(model, reference, V, T, PROMPT, NEW)
    (tmp_path / "model.toml").write_text(to_toml(model.config))
    assert load_config(ModelConfig, tmp_path / "model.toml").validate() == model.config


def test_numpy_reference_parity_with_scaling():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama", "tiny", n_kv_head=2, rope_scaling=dict(SCALING))).eval()
    idx = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(idx).numpy()
    ref = numpy_forward(numpy_weights(model), model.config, idx.numpy())
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)


def test_llama32_frequencies_match_numpy_reference():
    """Llama-3.2-1B's own numbers (head_dim 64, theta 5e5, factor 32, context 8192): the clamped torch form
    equals the case-by-case NumPy form."""
    scaling = dict(SCALING, factor=32.0, original_max_position_embeddings=8192)
    cfg = ModelConfig.preset("llama", "tiny", d_model=256, n_head=4, rope_theta=500000.0,
                             rope_scaling=scaling)
    plain = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    expected = llama3_scale(plain, scaling)
    assert (expected == plain).any() and (expected == plain / 32).any()  # both ends are reached
    np.testing.assert_allclose(rope_inv_freq(cfg).double().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("scaling, words", [
    ({**SCALING, "rope_type": "linear"}, "rope_scaling.rope_type='linear'"),
    ({k: v for k, v in SCALING.items() if k != "factor"}, "lacks 'factor'"),
    ({**SCALING, "factor": -2.0}, "rope_scaling.factor=-2.0"),
    ({**SCALING, "low_freq_factor": 4.0}, "low_freq_factor=4.0 must be below"),
    ({**SCALING, "original_max_position_embeddings": 0}, "original_max_position_embeddings=0"),
    ({**SCALING, "factr": 2.0}, "unknown key 'factr'"),
])
def test_bad_scaling_config_is_refused(scaling, words):
    with pytest.raises(ModelError, match=words):
        ModelConfig.preset("llama", "tiny", rope_scaling=scaling)


def test_scaling_with_learned_positions_is_refused():
    with pytest.raises(ModelError, match="position='learned'"):
        ModelConfig.preset("gpt2", "tiny", rope_scaling=dict(SCALING))


@pytest.mark.parametrize("changes, words", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_parameters.rope_type='yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type='dynamic'"),
    (dict(rope_scaling={**SCALING, "factor": 4.0}), "rope_scaling and rope_parameters disagree"),
])
def test_cli_refuses_other_rope_types_in_one_line(hf_llama3, tmp_path, capsys, changes, words):
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(hf_llama3[0], directory)
    cfg = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (directory / "config.json").write_text(json.dumps(cfg))
    assert main(["import-hf", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "out").exists()
