"""quantize() on whole models: both flavours, every method, generation, checkpoints through load_model (and
Transformer.load's refusal of them), AWQ's scale folding, and the bad inputs quantize() must refuse."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from llmlab.errors import CheckpointError, ConfigError, ModelError
from llmlab.infer import generate
from llmlab.infer.quant import QuantLinear, load_model, quantize, set_kernel
from llmlab.model import ModelConfig, Transformer
from llmlab.model.hf import export_hf

SHAPES = {"gpt2": {}, "llama": {"n_kv_head": 2}}  # llama with GQA: AWQ must skip the v -> o fold


def _model(flavour: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(flavour, "tiny", **{**SHAPES[flavour], **overrides})
    return Transformer(cfg).eval().requires_grad_(False)


def _calib(n=8, T=32, seed=1) -> torch.Tensor:
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("method,bits", [("rtn", 8), ("rtn", 4), ("gptq", 4), ("awq", 4), ("gptq", 8)])
def test_quantize_generate_save_load(flavour, method, bits, tmp_path):
    model = _model(flavour)
    ref = model(IDS)
    calib = None if method == "rtn" else _calib()
    out = quantize(model, method, bits, 32, calib, progress=False)
    assert out is model
    linears = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert not linears and len(quant) == 4 * model.config.n_layer
    assert isinstance(model.lm_head, nn.Linear)  # the head stays in full precision by default
    logits = model(IDS)
    rel = float((logits - ref).norm() / ref.norm())
    assert rel < (0.02 if bits == 8 else 0.12), rel

    text = generate(model, [1, 2, 3], 10, temperature=0.8, top_k=20, seed=0)
    assert text.shape == (13,) and int(text.max()) < 256 and text[:3].tolist() == [1, 2, 3]

    model.save(tmp_path / "q")
    entry = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert entry["method"] == method and entry["bits"] == bits
    assert entry["group_size"] == (32 if bits == 4 else None)
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == model.quantization
    assert torch.equal(loaded(IDS), logits)  # identical logits, same kernels
    set_kernel(loaded, "dequant")
    set_kernel(model, "dequant")
    assert torch.equal(loaded(IDS), model(IDS))
    assert torch.equal(generate(loaded, [1, 2, 3], 10, temperature=0),
                       generate(model, [1, 2, 3], 10, temperature=0))


def test_quantized_file_is_smaller(tmp_path):
    model = _model("llama", d_model=128, n_head=4)
    model.save(tmp_path / "fp32")
    sizes = {"fp32": (tmp_path / "fp32" / "model.safetensors").stat().st_size}
    for bits in (8, 4):
        q = quantize(_model("llama", d_model=128, n_head=4), "rtn", bits, 32, progress=False)
        q.save(tmp_path / f"int{bits}")
        sizes[bits] = (tmp_path / f"int{bits}" / "model.safetensors").stat().st_size
    block_params = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    # int8 saves 3 of every 4 bytes of the block weights, int4 (g32, fp16 scale + uint8 zero) ~ 7/8 minus
    # overhead
    assert sizes["fp32"] - sizes[8] > 0.74 * 3 * block_params
    assert sizes["fp32"] - sizes[4] > 0.80 * 3.5 * block_params


class _Unquantized(nn.Module):
    """Stands in for RTN in the folding test: the scaled fp layer, with AWQ's explicit input scale."""

    def __init__(self, linear, input_scale):
        super().__init__()
        self.linear, self.input_scale = linear, input_scale

    def forward(self, x):
        return self.linear(x if self.input_scale is None else x * self.input_scale)


@pytest.mark.parametrize("flavour,overrides", [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_head": 2})])
def test_awq_scale_folding_is_exact(flavour, overrides, monkeypatch):
    """With quantization switched off, the model after AWQ's folds computes the same function."""
    import llmlab.infer.quant.rtn as rtn

    monkeypatch.setattr(rtn, "rtn_linear", lambda linear, bits, g, clip=None, input_scale=None:
                        _Unquantized(linear, input_scale))
    torch.manual_seed(0)
    model = _model(flavour, **overrides) if flavour == "gpt2" else Transformer(
        ModelConfig.preset("llama", "tiny", tie_embeddings=False, **overrides)).eval().requires_grad_(False)
    ref = model(IDS)
    quantize(model, "awq", 4, 32, _calib(), include_head=flavour == "llama", progress=False)
    norms = model.blocks[0].attn_norm.weight
    assert not torch.allclose(norms, torch.ones_like(norms))  # scales were really folded in
    assert torch.allclose(model(IDS), ref, rtol=1e-4, atol=1e-4)


def test_include_head_quantizes_an_untied_head(tmp_path):
    model = _model("llama", tie_embeddings=False)
    quantize(model, "gptq", 4, 32, _calib(), include_head=True, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    model.save(tmp_path / "q")
    assert torch.equal(load_model(tmp_path / "q")(IDS), model(IDS))
    with pytest.raises(ConfigError, match="tie"):
        quantize(_model("gpt2"), "rtn", 8, include_head=True)


def test_act_order_and_options(tmp_path):
    model = _model("gpt2")
    quantize(model, "gptq", 4, 32, _calib(), act_order=True, progress=False, blocksize=32, percdamp=0.05)
    assert model.quantization["act_order"] is True
    model.save(tmp_path / "q")
    assert torch.equal(load_model(tmp_path / "q")(IDS), model(IDS))


def test_quantize_bad_inputs():
    with pytest.raises(ConfigError, match="unknown quantization method 'foo'"):
        quantize(_model("gpt2"), "foo", 4, 32)
    with pytest.raises(ConfigError, match="bits=3"):
        quantize(_model("gpt2"), "rtn", 3)
    with pytest.raises(ConfigError, match="group_size=48 does not divide the input width 64 of layer "
                                          "blocks.0"):
        quantize(_model("gpt2"), "rtn", 4, 48)
    # a d_model=256 llama has a 704-wide SwiGLU MLP (like cpu-demo): 128 divides d_model but not 704
    with pytest.raises(ConfigError, match=r"input width 704 of layer blocks\.0\.mlp\.proj; "
                                          r"use one of 64, 32"):
        quantize(_model("llama", d_model=256), "rtn", 4, 128)
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(_model("gpt2"), "gptq", 4, 32)
    with pytest.raises(ConfigError, match="exceeds the model's block_size 64"):
        quantize(_model("gpt2"), "awq", 4, 32, _calib(T=65))
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        quantize(_model("gpt2"), "gptq", 4, 32, _calib() + 1000)
    model = quantize(_model("gpt2"), "rtn", 8)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(model, "rtn", 4, 32)


def test_load_rejects_a_bad_quantization_entry(tmp_path):
    model = quantize(_model("gpt2"), "rtn", 4, 32)
    model.save(tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["quantization"]["group_size"] = 48
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="quantization"):
        load_model(tmp_path / "q")
    data["quantization"]["group_size"] = 16  # valid scheme, but tensors of another shape
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "q")


def test_plain_loaders_refuse_a_quantized_checkpoint_in_one_line(tmp_path):
    quantize(_model("gpt2"), "rtn", 8).save(tmp_path / "q")
    with pytest.raises(CheckpointError, match=r"'quantization' entry in config.json.*"
                                              r"load it with llmlab.infer.quant.load_model\(path\)$") as e:
        Transformer.load(tmp_path / "q")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="cannot export .*'quantization' entry.*export the full-precision"):
        export_hf(tmp_path / "q", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_load_model_reads_full_precision_checkpoints_as_transformer_load(tmp_path):
    model = _model("llama")
    model.save(tmp_path / "fp")
    loaded = load_model(tmp_path / "fp")
    assert not getattr(loaded, "quantization", None)
    assert torch.equal(loaded(IDS), Transformer.load(tmp_path / "fp")(IDS))
    assert torch.equal(loaded(IDS), model(IDS))


@pytest.mark.parametrize("clip", [True, False])
def test_awq_clipping_search_runs_only_when_asked(clip, monkeypatch, tmp_path):
    """clip=False (llmlab quantize --awq-no-clip) skips the clipping search: the layers keep their plain
    ranges after scaling, which for a layer alone is exactly RTN of the scaled weight without clips."""
    import llmlab.infer.quant.awq as awq

    searched = []
    real = awq.search_clip
    monkeypatch.setattr(awq, "search_clip", lambda *a, **k: searched.append(1) or real(*a, **k))
    model = _model("llama")
    quantize(model, "awq", 4, 32, _calib(), clip=clip, progress=False)
    assert bool(searched) == clip and len(searched) == (4 * model.config.n_layer if clip else 0)
    assert model.quantization["clip"] is clip
    model.save(tmp_path / "q")
    assert load_model(tmp_path / "q").quantization["clip"] is clip
    assert torch.isfinite(model(IDS)).all()
