"""LoRA: a fresh adapter is the base, merged equals unmerged, only adapters train, adapters switch off,
adapter-only checkpoints load on top of their base."""

from __future__ import annotations

import pytest
import torch

from llmlab.align.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    write_lora,
)
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model import ModelConfig, Transformer


def tiny(flavour: str = "llama") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(flavour, "tiny", vocab_size=96, block_size=32)).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def trained_adapters(model: Transformer) -> Transformer:
    """Random non-zero B so the adapters really change the outputs."""
    torch.manual_seed(1)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_fresh_adapters_change_nothing(flavour):
    model = tiny(flavour)
    with torch.no_grad():
        before = model(ids())
        apply_lora(model, LoRAConfig(rank=4))
        after = model(ids())
    assert len(lora_modules(model)) == 4 * model.config.n_layer
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_merged_equals_unmerged(flavour):
    model = trained_adapters(apply_lora(tiny(flavour), LoRAConfig(rank=4, alpha=8)))
    with torch.no_grad():
        base = tiny(flavour)(ids())
        unmerged = model(ids())
        merge_lora(model)
        merged = model(ids())
    assert (unmerged - base).abs().max() > 1e-3  # the adapters matter
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(tiny(flavour).state_dict())  # a plain Transformer again
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_only_adapters_get_gradients():
    model = apply_lora(tiny(), LoRAConfig(rank=2, targets=["attn.qkv", "mlp.proj"])).train()
    model.loss(ids(), ids(1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == {f"blocks.{i}.{t}.lora_{m}" for i in range(model.config.n_layer)
                         for t in ("attn.qkv", "mlp.proj") for m in "AB"}


def test_adapters_disabled_gives_the_base():
    model = trained_adapters(apply_lora(tiny(), LoRAConfig(rank=4)))
    with torch.no_grad():
        base = tiny()(ids())
        with adapters_disabled(model):
            off = model(ids())
        on = model(ids())
    torch.testing.assert_close(off, base, atol=0, rtol=0)
    assert (on - base).abs().max() > 1e-3
    assert all(m.adapter_on for m in lora_modules(model))


def test_merge_matches_the_formula():
    model = trained_adapters(apply_lora(tiny(), LoRAConfig(rank=4, alpha=2)))
    m = model.blocks[0].attn.qkv
    assert isinstance(m, LoRALinear)
    expected = m.weight + m.lora_B @ m.lora_A * 0.5
    merged = m.merged()
    torch.testing.assert_close(merged.weight, expected)


def test_adapter_checkpoint_holds_only_adapters_and_loads_on_its_base(tmp_path):
    base = tiny()
    base.save(tmp_path / "base")
    model = trained_adapters(apply_lora(Transformer.load(tmp_path / "base"), LoRAConfig(rank=4)))
    (tmp_path / "ckpt").mkdir()
    write_lora(model, tmp_path / "ckpt", tmp_path / "base")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(stored) == set(lora_state_dict(model))
    with torch.no_grad():
        expected = model(ids())
        torch.testing.assert_close(load_lora(tmp_path / "ckpt")(ids()), expected, atol=0, rtol=0)
        torch.testing.assert_close(load_lora(tmp_path / "ckpt", merge=True)(ids()), expected, atol=1e-5,
                                   rtol=0)
    with pytest.raises(CheckpointError, match="not a LoRA checkpoint"):
        load_lora(tmp_path / "base")


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="lora.targets"):
        apply_lora(tiny(), LoRAConfig(rank=2, targets=["attn.q"]))
    with pytest.raises(ConfigError, match="lora.rank"):
        apply_lora(tiny(), LoRAConfig(rank=0))
