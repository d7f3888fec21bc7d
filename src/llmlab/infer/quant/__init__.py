"""Weight-only post-training quantization: int8 and int4 with RTN, GPTQ or AWQ.

    from llmlab.infer.quant import quantize
    from llmlab.infer.quant.calib import calibration_tokens
    calib = calibration_tokens("data/stdlib/shards", n_samples=128, seq_len=256)
    model = quantize(model, method="gptq", bits=4, group_size=128, calib=calib)   # in place, returned
    model.save("runs/demo/ckpt-int4")
    model = load_model("runs/demo/ckpt-int4")    # any checkpoint, quantized or not

    llmlab quantize runs/demo/ckpt-600 --out runs/demo/int4-gptq --method gptq --bits 4 --group-size 64
    llmlab eval ppl runs/demo/ckpt-600 runs/demo/int4-gptq --data data/stdlib/shards

What is quantized: every nn.Linear inside the Transformer blocks (attention qkv and output projections,
MLP fc and projection). The token/position embeddings and the LM head stay in full precision by default:
they are a large share of a small model's parameters but the head is the layer most sensitive to
rounding (its errors go straight into the logits), and with tied embeddings it *is* the embedding table.
`include_head=True` also quantizes an untied head (the Llama flavour's default).

Methods (bits=8: symmetric per-output-channel int8; bits=4: group-wise int4 with scales and zero points;
formats in linear.py):
  rtn   round to nearest, no data (rtn.py)
  gptq  Frantar et al. 2022, second-order error feedback from calibration activations (gptq.py)
  awq   Lin et al. 2023, activation-aware channel scaling + clipping search (awq.py)
GPTQ and AWQ need `calib`, a LongTensor [n_samples, seq_len] of token ids (calib.py builds one).

A quantized model records its scheme in `model.quantization` ({"method", "bits", "group_size", ...});
Transformer.save writes it into config.json as the "quantization" entry. The model package knows nothing of
quantization, so Transformer.load refuses such a checkpoint; load_model reads it, putting empty QuantLinear
modules of the stored shapes in place (prepare_quantized) before the weights load. Every command that reads
a checkpoint for inference loads it with load_model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.infer.quant.linear import BITS, QuantLinear, check_scheme, set_kernel
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import CONFIG_FILE, WEIGHTS_FILE, Transformer
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer

METHODS = ("rtn", "gptq", "awq")
QUANT_KEY = "quantization"  # the config.json entry


def target_layers(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear that quantize() replaces, in execution order."""
    layers = [(f"blocks.{i}.{name}", m) for i, block in enumerate(model.blocks)
              for name, m in block.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    if include_head:
        layers.append(("lm_head", model.lm_head))
    return layers


def check_request(model: nn.Module, method: str, bits: int, group_size: int | None,
                  include_head: bool) -> None:
    """Every bad-input check quantize() makes before touching the model (ConfigError, one line each)."""
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    check_scheme(bits, group_size)
    if getattr(model, QUANT_KEY, None):
        raise ConfigError(f"the model is already quantized ({model.quantization}); quantize the "
                          "full-precision checkpoint instead")
    if include_head and model.config.tie_embeddings:
        raise ConfigError("include_head=True needs an untied LM head, but this model ties it to the token "
                          "embeddings (tie_embeddings=true); leave the head in full precision")
    for name, layer in target_layers(model, include_head):
        check_scheme(bits, group_size, layer.in_features, name)


def quantize(model: nn.Module, method: str = "rtn", bits: int = 8, group_size: int | None = 128,
             calib: torch.Tensor | None = None, *, include_head: bool = False, act_order: bool = False,
             kernel: str = "auto", batch_size: int = 8, progress: bool = True,
             **method_options) -> nn.Module:
    """Replace the model's linear layers by QuantLinear modules in place and return the model.

    method: "rtn" | "gptq" | "awq"; bits: 8 (per-channel, group_size ignored) or 4 (groups of group_size
    input columns; group_size must divide every quantized layer's input width). calib: LongTensor
    [n_samples, seq_len] for GPTQ/AWQ. act_order: GPTQ's activation-order heuristic. kernel: see linear.py.
    method_options go to gptq_model (blocksize, percdamp) or awq_model (n_grid, clip).
    """
    from llmlab.infer.quant.calib import check_calibration

    check_request(model, method, bits, group_size, include_head)
    group_size = group_size if bits == 4 else None
    if method != "rtn":
        if calib is None:
            raise ConfigError(f"{method.upper()} needs calibration data: pass "
                              "calib=LongTensor[n_samples, seq_len] "
                              "(llmlab.infer.quant.calib.calibration_tokens builds one)")
        cfg = model.config
        calib = check_calibration(calib, cfg.vocab_size, cfg.block_size).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    entry = {"method": method, "bits": bits, "group_size": group_size, "lm_head": include_head}
    with torch.no_grad():
        if method == "rtn":
            _quantize_rtn(model, bits, group_size, include_head)
        elif method == "gptq":
            from llmlab.infer.quant.gptq import gptq_model

            gptq_model(model, calib, bits, group_size, include_head=include_head, act_order=act_order,
                       batch_size=batch_size, progress=progress, **method_options)
            entry["act_order"] = act_order
        else:
            from llmlab.infer.quant.awq import awq_model

            scaled = awq_model(model, calib, bits, group_size, include_head=include_head,
                               batch_size=batch_size, progress=progress, **method_options)
            entry["input_scaled"] = scaled
            entry["clip"] = method_options.get("clip", True)
    if method != "rtn":
        entry["calibration"] = {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
    model.quantization = entry
    set_kernel(model, kernel)
    model.train(was_training)
    return model


def _quantize_rtn(model: nn.Module, bits: int, group_size: int | None, include_head: bool) -> None:
    from llmlab.infer.quant.rtn import rtn_linear
    from llmlab.infer.quant.sequential import replace_module

    for name, layer in target_layers(model, include_head):
        replace_module(model, name, rtn_linear(layer, bits, group_size))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype=None) -> Transformer:
    """Transformer.load for any llmlab language-model checkpoint, quantized or not (same arguments). A reward
    model (scalar head) is refused: every caller generates, scores or quantizes through the LM head."""
    source = Path(path) / CONFIG_FILE

    def prepare(model: nn.Module, meta: dict) -> None:
        require_lm_head(model.config, path)
        if meta.get(QUANT_KEY):
            prepare_quantized(model, meta[QUANT_KEY], source)

    return Transformer.load(path, device=device, dtype=dtype, prepare=prepare)


def require_lm_head(config: ModelConfig, path: str | Path) -> None:
    """Refuse a reward/value model (head "scalar": no LM head) where text is generated or scored."""
    if config.head == "scalar":
        raise CheckpointError(f"checkpoint {path} is a reward model (scalar head, no LM head): it cannot "
                              "generate, score or quantize text as a language model; score completions "
                              f"with `llmlab reward score {path} --data FILE --out FILE`, or pass a "
                              "language-model checkpoint")


def prepare_quantized(model: nn.Module, entry: dict, source: str | Path = "config.json") -> nn.Module:
    """Swap in empty QuantLinear modules matching a config.json "quantization" entry (for load_model): the
    shapes the checkpoint's tensors must have, then load_state_dict fills them."""
    try:
        method, bits, group_size = entry["method"], entry["bits"], entry.get("group_size")
        include_head = bool(entry.get("lm_head", False))
        scaled = set(entry.get("input_scaled", []))
        if method not in METHODS or bits not in BITS:
            raise ConfigError(f"method={method!r}, bits={bits!r}")
        check_request_shapes = target_layers(model, include_head)
        for name, layer in check_request_shapes:
            check_scheme(bits, group_size, layer.in_features, name)
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{source}: the \"quantization\" entry {entry!r} is not valid ({e}); re-run "
                              "`llmlab quantize` on the full-precision checkpoint") from None
    from llmlab.infer.quant.sequential import replace_module

    for name, layer in check_request_shapes:
        dtype = layer.weight.dtype if isinstance(layer, nn.Linear) else torch.float32
        device = layer.weight.device if hasattr(layer, "weight") else None
        q = QuantLinear(layer.in_features, layer.out_features, bits, group_size, layer.bias is not None,
                        input_scale=name in scaled, device=device, dtype=dtype)
        replace_module(model, name, q)
    model.quantization = dict(entry)
    return model


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, QUANT_KEY, None))


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, method: str = "rtn", bits: int = 8,
                        group_size: int | None = 128, *, calib_source: str | None = None,
                        calib_samples: int = 128, calib_len: int | None = None, seed: int = 0,
                        act_order: bool = False, include_head: bool = False,
                        tokenizer: str | Path | None = None, device: str = "cpu", overwrite: bool = False,
                        progress: bool = True, **method_options) -> dict:
    """Load CHECKPOINT, quantize it, write OUT (config.json + model.safetensors + a copy of the tokenizer)
    atomically; return a summary dict. Every check runs before anything is written."""
    import shutil

    from llmlab.device import resolve_device
    from llmlab.fsutil import atomic_dir, check_output
    from llmlab.infer.quant.calib import calibration_tokens

    checkpoint, out = Path(checkpoint), Path(out)
    calib_path = calib_source if calib_source and Path(calib_source).exists() else None
    check_output(out, inputs=[checkpoint, tokenizer, calib_path], overwrite=overwrite, what="--out")
    dev = resolve_device(device)
    model = load_model(checkpoint, device=dev, dtype=torch.float32)  # a quantized one is refused next
    check_request(model, method, bits, group_size, include_head)
    tok_dir = Path(tokenizer) if tokenizer is not None else checkpoint / "tokenizer"
    if tokenizer is not None:  # the copy shipped with OUT must be the model's own
        require_same_tokenizer(checkpoint_tokenizer(checkpoint, model.config.vocab_size),
                               directory_tokenizer(tok_dir),
                               "quantize with the model's tokenizer (omit --tokenizer to use CKPT/tokenizer)")
    calib = None
    if method != "rtn":
        seq_len = calib_len if calib_len is not None else min(256, model.config.block_size)
        if isinstance(seq_len, int) and seq_len > model.config.block_size:  # before any text is encoded
            raise ConfigError(f"calibration length {seq_len} exceeds the model's block_size "
                              f"{model.config.block_size}; use --calib-len <= {model.config.block_size}")
        source = calib_source if calib_source is not None else "stdlib"
        calib = calibration_tokens(source, calib_samples, seq_len, seed=seed,
                                   tokenizer=tok_dir if tok_dir.is_dir() else None)
    start = time.perf_counter()
    quantize(model, method, bits, group_size, calib, include_head=include_head, act_order=act_order,
             progress=progress, **method_options)
    seconds = time.perf_counter() - start
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_into(tmp)
        if tok_dir.is_dir():
            shutil.copytree(tok_dir, Path(tmp) / "tokenizer")
    return {"checkpoint": str(checkpoint), "out": str(out), **model.quantization,
            "seconds": round(seconds, 2), "bytes_in": (checkpoint / WEIGHTS_FILE).stat().st_size,
            "bytes_out": (out / WEIGHTS_FILE).stat().st_size}


__all__ = ["quantize", "load_model", "require_lm_head", "prepare_quantized", "quantize_checkpoint",
           "QuantLinear", "set_kernel", "METHODS", "is_quantized", "target_layers"]
