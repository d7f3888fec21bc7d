"""Hugging Face interop: load a local GPT-2 / Llama-family model directory into a Transformer, and write one
back.

    from llmlab.model.hf import load_hf, save_hf
    model, tok = load_hf("path/to/SmolLM-135M")         # tok is None when there is no tokenizer.json
    model, _ = load_hf("gpt2-dir", dtype="bf16", tokenizer=False)
    save_hf(model, "out-dir", tokenizer=tok)            # AutoModelForCausalLM / AutoTokenizer load it offline

Reward models. A Transformer with a scalar head (ModelConfig.head="scalar", see llmlab.align.reward) is
written as GPT2ForSequenceClassification / LlamaForSequenceClassification / Qwen2ForSequenceClassification
with one label: the backbone's tensors as for a language model plus `score.weight` [1, d_model] (no bias, in
both), and config.json's pad_token_id set to the tokenizer's padding id, because transformers reads the score
at the last token that is not pad_token_id, which is where llmlab reads it (the last real token). A
*ForSequenceClassification directory with one label loads back with head="scalar", so HF reward models import
like language models.

Supported (model_type in config.json): gpt2, llama, mistral and qwen2, which covers GPT-2, Llama 1/2/3, Llama
3.1/3.2 (their "llama3" rope scaling is reproduced), TinyLlama, SmolLM (tied embeddings), Mistral without a
sliding window in use and Qwen2/2.5 (biases on q/k/v only). Tokenizers come through Tokenizer.from_hf, which
reads byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2); the SentencePiece-style tokenizer.json of Llama 2 /
TinyLlama / Mistral is refused there, so import those with tokenizer=False (`--no-tokenizer`). Anything the
Transformer cannot reproduce exactly -- other rope scaling types (linear, dynamic, yarn, longrope), sliding
windows in use, mixture-of-experts, other activations, a head_dim that is not hidden_size/num_heads, unknown
model types -- is refused with a ModelError naming the key, never loaded approximately. Missing, extra or
mis-shaped tensors raise a CheckpointError naming the tensor and the shape config.json implies.

Tensor layout. llmlab's parameter names map one-to-one onto HF modules (see transformer.py's docstring); two
mappings need care. GPT-2 stores its matrices as Conv1D weights, [in, out], the transpose of nn.Linear, and
its c_attn is already the fused q|k|v projection, so it only needs transposing. Llama-family checkpoints keep
q/k/v and gate/up separate; llmlab fuses each group into one Linear by stacking them along the output
dimension, which is what `Slot.op == "cat"` does (and export splits them back). RoPE needs no permutation:
llmlab uses the same "rotate_half" layout as HF Llama.

Memory. The model is built on the meta device (shapes without storage); each llmlab tensor is then allocated
once, on the target device in the target dtype, and filled from its HF tensors -- read straight from the file
when nothing changes (fused q|k|v and gate|up straight into their rows), else staged in one reused scratch
buffer and copied in transposed (GPT-2) or converted -- and assigned into the model. The peak is the finished
model plus the scratch buffer (the largest staged tensor), never two copies; hf_files.py says why the files
are read rather than memory-mapped. pytorch_model.bin is read only with torch.load(weights_only=True).
Export streams the safetensors file tensor by tensor for the same reason.

dtype: None keeps the checkpoint's dtype (that of its embedding table); "fp32", "bf16", "fp16", "auto" or a
torch.dtype converts each tensor as it is read.

Dropout: the imported config keeps the model's own training dropout (GPT-2's resid_pdrop 0.1, Llama's
attention_dropout, usually 0), which llmlab applies to embeddings, attention and residuals alike; models are
returned in eval mode, so it only matters when fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.errors import CheckpointError, ModelError, TokenizerError
from llmlab.fsutil import atomic_dir, check_output
from llmlab.model.config import LLAMA3_SCALING_KEYS, ModelConfig
from llmlab.model.hf_files import PT_BIN, SAFETENSORS, HFWeights, Scratch, write_safetensors
from llmlab.model.transformer import EXTENSIONS, Transformer
from llmlab.tokenizer.chat import resolve_format
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer.json", "tokenizer_config.json", \
    "special_tokens_map.json"

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2", *LLAMA_FAMILY)
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"  # the architectures suffix of a reward-model export
SCORE = "score.weight"                                  # its head, top-level in HF files as in llmlab's state

# Model types people will try, with the reason they do not map onto this Transformer.
UNSUPPORTED_TYPES = {
    **{t: "it is a mixture-of-experts model" for t in
       ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe", "jamba",
        "granitemoe", "phimoe", "llama4")},
    "qwen3": "it normalises queries and keys (q_norm/k_norm)",
    "gemma": "it scales embeddings and uses offset RMSNorm weights and GeGLU",
    "gemma2": "it soft-caps logits and alternates sliding-window layers",
    "gemma3": "it soft-caps logits and alternates sliding-window layers",
    "phi": "it uses partial rotary embeddings and parallel attention/MLP blocks",
    "phi3": "it fuses qkv/gate_up differently and may use LongRoPE scaling",
    "gpt_neox": "it uses parallel attention/MLP blocks and partial rotary embeddings",
    "gptj": "it uses parallel attention/MLP blocks and interleaved rotary embeddings",
    "falcon": "it uses parallel attention/MLP blocks",
    "opt": "it uses ReLU MLPs and offset learned positions",
    "bloom": "it uses ALiBi instead of position embeddings",
    "mpt": "it uses ALiBi instead of position embeddings",
}

# Per-layer module names: llmlab module -> HF module(s), in the order they are stacked along dim 0.
GPT2_LAYER = {"attn_norm": ["ln_1"], "mlp_norm": ["ln_2"], "attn.qkv": ["attn.c_attn"],
              "attn.proj": ["attn.c_proj"], "mlp.fc": ["mlp.c_fc"], "mlp.proj": ["mlp.c_proj"]}
LLAMA_LAYER = {"attn_norm": ["input_layernorm"], "mlp_norm": ["post_attention_layernorm"],
               "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "attn.proj": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"],
               "mlp.proj": ["mlp.down_proj"]}
GPT2_TOP = {"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"}
LLAMA_TOP = {"tok_emb": "embed_tokens", "norm": "norm"}
GPT2_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # stored [in, out]

# Buffers some exporters left in their files; they carry no weights (a causal mask, RoPE frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------------------

def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a HF model directory as a dict, with CheckpointError for a missing or unreadable
    file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face model directory {path} does not exist; pass a local directory "
                              f"holding {CONFIG} and the weights (download it first, e.g. with "
                              "huggingface-cli)")
    file = path / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG}; point at a Hugging Face model directory "
                              f"({CONFIG} + {SAFETENSORS} or {PT_BIN})")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-download or re-save the model") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file} holds a {type(hf).__name__}, not a JSON object; re-save the model")
    return hf


def config_from_hf(hf: dict[str, Any], source: str = CONFIG) -> ModelConfig:
    """The ModelConfig equivalent to a HF config dict; ModelError for anything the Transformer cannot
    reproduce."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{source} has no 'model_type'; llmlab reads {', '.join(SUPPORTED)} models")
    if model_type in UNSUPPORTED_TYPES:
        raise ModelError(f"{source}: model_type {model_type!r} is not supported because "
                         f"{UNSUPPORTED_TYPES[model_type]}; llmlab imports {', '.join(SUPPORTED)}")
    if model_type not in SUPPORTED:
        raise ModelError(f"{source}: unknown model_type {model_type!r}; llmlab imports "
                         f"{', '.join(SUPPORTED)} (GPT-2 and Llama-family checkpoints)")
    _refuse_moe(hf, source)
    cfg = _gpt2_config(hf, source) if model_type == "gpt2" else _llama_config(hf, source)
    cfg = dataclasses.replace(cfg, head=_head(hf, source))
    try:
        return cfg.validate()
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from e


def _head(hf: dict, source: str) -> str:
    """"scalar" for a *ForSequenceClassification model with one label (a reward model), else "lm"."""
    if not any(str(a).endswith(SEQUENCE_CLASSIFICATION) for a in hf.get("architectures") or []):
        return "lm"
    labels = hf.get("id2label")
    # transformers reads the count from id2label, else num_labels, else its default of 2.
    n = len(labels) if isinstance(labels, dict) else hf.get("num_labels", 2)
    if n != 1:
        raise _refuse(source, "num_labels", n, "llmlab's scalar head gives one score per sequence, as a "
                      "reward model does; a classifier with several labels has no llmlab equivalent")
    return "scalar"


def _need(hf: dict, key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source} lacks {key!r}, which a {hf.get('model_type')} config needs; "
                              "re-save the model with transformers' save_pretrained")
    return hf[key]


def _refuse(source: str, key: str, value: Any, why: str) -> ModelError:
    return ModelError(f"{source}: {key}={value!r} is not supported ({why})")


def _refuse_moe(hf: dict, source: str) -> None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
        if hf.get(key):
            raise _refuse(source, key, hf[key], "mixture-of-experts layers; llmlab's MLP is dense")


def _gpt2_config(hf: dict, source: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise _refuse(source, "activation_function", act, "llmlab's GPT-2 MLP uses the tanh GELU, 'gelu_new'")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise _refuse(source, key, hf[key], f"llmlab's attention needs {key}={ok}")
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size", source), n_layer=_need(hf, "n_layer", source),
        n_head=_need(hf, "n_head", source), d_model=_need(hf, "n_embd", source), d_ff=hf.get("n_inner"),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), position="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=float(hf.get("resid_pdrop", 0.1)))


def _llama_config(hf: dict, source: str) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(source, "hidden_act", act, "llmlab's SwiGLU MLP uses silu")
    d, n_head = _need(hf, "hidden_size", source), _need(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != d:
        raise _refuse(source, "head_dim", head_dim,
                      f"llmlab needs head_dim = hidden_size / num_attention_heads = {d // n_head}")
    block_size = _need(hf, "max_position_embeddings", source)
    scaling = _rope_scaling(hf, source)
    _check_sliding_window(hf, source, block_size)
    bias, qkv_bias = _llama_biases(hf, source)
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size", source), n_layer=_need(hf, "num_hidden_layers", source),
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d,
        d_ff=_need(hf, "intermediate_size", source), block_size=block_size, position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
        # transformers' own default when the key is absent: untied for all three Llama-family classes.
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=float(hf.get("attention_dropout", 0.0)))


def _llama_biases(hf: dict, source: str) -> tuple[bool, bool | None]:
    """(bias, qkv_bias) for ModelConfig. Qwen2 always has q/k/v biases and nothing else; Llama's
    attention_bias puts biases on q/k/v *and* o, mlp_bias on all three MLP matrices -- llmlab has one switch
    for o + MLP."""
    if hf["model_type"] == "qwen2":
        return False, True
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ModelError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                         "supported (llmlab's Llama has biases on all linears or on none but q/k/v)")
    return attention_bias, None


def _rope_scaling(hf: dict, source: str) -> dict[str, Any] | None:
    """ModelConfig.rope_scaling for the file's RoPE: None for plain RoPE, the llama3 dict for Llama 3.1/3.2.

    transformers 4.x writes the scaling as `rope_scaling` (rope_type, or the older `type`) beside a top-level
    rope_theta; 5.x writes `rope_parameters`, which also holds rope_theta. Every other scaling type (linear,
    dynamic, yarn, longrope) changes the frequencies differently and is refused rather than silently ignored;
    so are two keys that disagree."""
    found: dict[str, dict[str, Any] | None] = {}
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise _refuse(source, key, params, "expected a JSON object")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise _refuse(source, f"{key}.rope_type", kind, "llmlab implements plain RoPE and 'llama3' "
                          "scaling only; other scaled variants change the rotary frequencies")
        factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise _refuse(source, "partial_rotary_factor", factor, "llmlab rotates the whole head")
        found[key] = None if kind == "default" else _llama3_params(params, key, source)
    kinds = list(found.values())
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        raise ModelError(f"{source}: rope_scaling and rope_parameters disagree ({kinds[0]} vs {kinds[1]}); "
                         "keep one of them (or make them equal) in config.json")
    return kinds[0] if kinds else None


def _llama3_params(params: dict, key: str, source: str) -> dict[str, Any]:
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in params]
    if missing:
        raise ModelError(f"{source}: {key} has rope_type 'llama3' but lacks {missing[0]!r}; llama3 scaling "
                         f"needs {', '.join(LLAMA3_SCALING_KEYS)} (re-save the model with transformers)")
    values = {k: params[k] for k in LLAMA3_SCALING_KEYS}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):  # JSON may write 8 for 8.0
        if isinstance(values[k], int) and not isinstance(values[k], bool):
            values[k] = float(values[k])
    return {"rope_type": "llama3", **values}  # ModelConfig.validate checks the numbers


def _check_sliding_window(hf: dict, source: str, block_size: int) -> None:
    """A sliding window only changes the result when it is shorter than the context, so a window >= the
    context (or none) is accepted; otherwise the model would attend further than it was trained to."""
    layer_types = hf.get("layer_types") or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise _refuse(source, "layer_types", odd[0], "llmlab uses full causal attention in every layer")
    if hf["model_type"] == "mistral":
        window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    elif hf["model_type"] == "qwen2" and hf.get("use_sliding_window", False):
        window = hf.get("sliding_window", 4096) if hf.get("max_window_layers", 28) < hf["num_hidden_layers"] \
            else None
    else:
        window = None
    if window is not None and window < block_size:
        raise ModelError(f"{source}: sliding_window={window} with max_position_embeddings={block_size} is "
                         "not supported (llmlab attends over the whole context); set "
                         f"max_position_embeddings to {window} in config.json to use the model on at most "
                         f"{window} tokens")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, specials: dict[str, int | None]) -> dict[str, Any]:
    """HF config.json fields for a Transformer (GPT2Config, LlamaConfig or Qwen2Config); ModelError when the
    combination of options has no Hugging Face architecture. A scalar head names the
    *ForSequenceClassification architecture, with one label."""
    dtype_name = str(dtype).removeprefix("torch.")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
              # transformers 5 reads "dtype", 4.x "torch_dtype"; both accept the other's file.
              "dtype": dtype_name, "torch_dtype": dtype_name, **specials}
    if cfg.head == "scalar":  # as transformers writes num_labels=1
        common.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if _flavour(cfg) == "gpt2":
        return {"architectures": [_architecture(cfg, "GPT2")], "model_type": "gpt2", "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_embd": cfg.d_model,
                "n_inner": None if cfg.ffn_dim == 4 * cfg.d_model else cfg.ffn_dim,
                "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout, "scale_attn_weights": True, **common}
    qwen2 = hf_model_type(cfg) == "qwen2"
    out = {"architectures": [_architecture(cfg, "Qwen2" if qwen2 else "Llama")],
           "model_type": "qwen2" if qwen2 else "llama", "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.d_model,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
           "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "attention_dropout": cfg.dropout,
           # rope_theta/rope_scaling for transformers 4.x, rope_parameters for 5.x.
           "rope_theta": cfg.rope_theta, "rope_scaling": _hf_rope_scaling(cfg),
           "rope_parameters": {**(_hf_rope_scaling(cfg) or {"rope_type": "default"}),
                               "rope_theta": cfg.rope_theta},
           **common}
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return out


def _architecture(cfg: ModelConfig, family: str) -> str:
    """The HF class a config exports as: the family's LM class, or its sequence classifier (scalar head)."""
    if cfg.head == "scalar":
        return family + SEQUENCE_CLASSIFICATION
    return "GPT2LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM"


def _hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """config.rope_scaling as transformers writes it (a fresh dict each call), or None for plain RoPE."""
    return None if cfg.rope_scaling is None else dict(cfg.rope_scaling)


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type a config exports as: gpt2, llama, or qwen2 (Llama with biases on q/k/v only)."""
    if _flavour(cfg) == "gpt2":
        return "gpt2"
    return "qwen2" if cfg.attn_bias and not cfg.bias else "llama"


def _flavour(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': the HF architecture whose computation equals this config's, or ModelError."""
    gpt2 = dict(position="learned", norm="layernorm", mlp="gelu", bias=True, attn_bias=True)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu")
    if all(getattr(cfg, k) == v for k, v in gpt2.items()):
        if cfg.kv_heads != cfg.n_head:
            raise ModelError(f"GPT-2 has no grouped-query attention (n_kv_head={cfg.kv_heads}, "
                             f"n_head={cfg.n_head}); such a model cannot be exported to Hugging Face")
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()) and not (cfg.bias and not cfg.attn_bias):
        return "llama"
    return _no_flavour(cfg, gpt2, llama)


def _no_flavour(cfg: ModelConfig, gpt2: dict, llama: dict):
    target = gpt2 if cfg.position == "learned" else llama
    bad = [f"{k}={getattr(cfg, k)!r}" for k, v in target.items() if getattr(cfg, k) != v]
    if not bad:  # llama flavour with biases on o/MLP but not q/k/v
        bad = [f"bias=True with qkv_bias={cfg.qkv_bias}"]
    name = "GPT-2" if target is gpt2 else "Llama"
    raise ModelError(f"this model (position={cfg.position!r}) differs from {name} in {', '.join(bad)}; "
                     "Hugging Face has no architecture for it, so it cannot be exported (use the gpt2 or "
                     "llama preset)")


# ----------------------------------------------------------------------------------------------------------
# tensor names and layouts
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Slot:
    """One llmlab tensor and the HF tensors it is made of.

    op: "copy" (same layout), "t" (GPT-2 Conv1D weight, stored transposed) or "cat" (HF tensors stacked along
    dim 0, in order: q|k|v, gate|up)."""

    name: str
    shape: tuple[int, ...]
    sources: list[str]
    op: str = "copy"
    q_rows: int = 0  # rows of the q block in a fused qkv weight (n_head * head_dim)

    def hf_shapes(self) -> list[tuple[int, ...]]:
        if self.op == "t":
            return [self.shape[::-1]]
        if self.op == "cat":
            return [(n, *self.shape[1:]) for n in self.splits()]
        return [self.shape]

    def splits(self) -> list[int]:
        # q gets n_head heads and k, v one share each of what is left; gate and up are equal halves.
        if len(self.sources) == 3:
            kv = (self.shape[0] - self.q_rows) // 2
            return [self.q_rows, kv, kv]
        return [self.shape[0] // len(self.sources)] * len(self.sources)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.op == "t":
            return [tensor.t().contiguous()]
        if self.op == "cat":
            return list(tensor.split(self.splits(), dim=0))
        return [tensor]


def tensor_map(model: Transformer, prefix: str) -> list[Slot]:
    """A Slot for every tensor the model stores (the tied LM head excluded), HF names under `prefix`
    ("transformer." / "model." in LMHead / ForCausalLM / ForSequenceClassification files, "" in bare-model
    files); a scalar head's score.weight keeps its name, top-level."""
    cfg = model.config
    gpt2 = cfg.position == "learned"
    layer_map, top, layers = (GPT2_LAYER, GPT2_TOP, "h") if gpt2 else (LLAMA_LAYER, LLAMA_TOP, "layers")
    slots = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                slots.append(Slot(name, tuple(t.shape), ["lm_head.weight"]))
            continue
        if name == SCORE:
            slots.append(Slot(name, tuple(t.shape), [SCORE]))
            continue
        module, leaf = name.rsplit(".", 1)
        if module.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            hf_modules = [f"{prefix}{layers}.{i}.{m}" for m in layer_map[rest]]
            op = "t" if gpt2 and rest in GPT2_CONV1D and leaf == "weight" else \
                "cat" if len(hf_modules) > 1 else "copy"
        else:
            hf_modules, op = [prefix + top[module]], "copy"
        slots.append(Slot(name, tuple(t.shape), [f"{m}.{leaf}" for m in hf_modules], op,
                          q_rows=cfg.n_head * cfg.head_dim))
    return slots


# ----------------------------------------------------------------------------------------------------------
# checking weights
# ----------------------------------------------------------------------------------------------------------

def _detect_prefix(names: set[str], first: str, prefixes: tuple[str, ...]) -> str:
    """The module prefix the files use, found from the embedding table's name (e.g. 'wte' or
    'embed_tokens')."""
    for prefix in prefixes:
        if prefix + first + ".weight" in names:
            return prefix
    return prefixes[0]


def check_weights(weights: HFWeights, slots: list[Slot], tied: bool) -> None:
    """Every HF tensor the config implies is present with its shape, and no tensor would be left unused."""
    names = set(weights.where)
    used = set()
    for slot in slots:
        for name, shape in zip(slot.sources, slot.hf_shapes(), strict=True):
            if name not in names:
                raise CheckpointError(f"{weights.path} lacks tensor {name!r} (expected shape {shape}) that "
                                      f"{CONFIG} implies; the weights and {CONFIG} come from different "
                                      "models")
            got = weights.shape(name)
            if got != shape:
                raise CheckpointError(f"{weights.path}: tensor {name!r} has shape {got} but {CONFIG} implies "
                                      f"{shape}; the weights and {CONFIG} do not match")
            used.add(name)
    if tied:
        used.add("lm_head.weight")  # some writers keep the tied copy; it equals the embedding
    extra = sorted(n for n in names - used if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{weights.path} has tensor {extra[0]!r} ({len(extra)} unexpected in all) that "
                              f"a {CONFIG}-shaped model does not use; the architecture has parts llmlab does "
                              "not implement, or the weights and config.json do not match")


# ----------------------------------------------------------------------------------------------------------
# load / save
# ----------------------------------------------------------------------------------------------------------

def load_hf(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
            tokenizer: bool = True, progress: bool = False):
    """Load a local HF model directory -> (Transformer in eval mode, Tokenizer | None).

    dtype None keeps the checkpoint's dtype; device is where the weights go, one tensor at a time. The
    tokenizer comes from tokenizer.json when present (see load_hf_tokenizer), else None; tokenizer=False skips
    it (e.g. for a tokenizer type llmlab cannot read). Nothing is read from the weights before config.json and
    the tokenizer have been accepted, so a refusal comes fast.
    """
    from llmlab.device import resolve_device, resolve_dtype

    path = Path(path)
    source = str(path / CONFIG)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, source)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    target = None if dtype is None else resolve_dtype(dtype, device)
    tok = load_hf_tokenizer(path) if tokenizer else None  # fail on a bad tokenizer before reading gigabytes
    weights = HFWeights(path)
    try:
        model = _assemble(cfg, weights, target, device, progress)
    finally:
        weights.close()
    return model, tok


def _assemble(cfg: ModelConfig, weights: HFWeights, dtype, device, progress: bool) -> Transformer:
    with torch.device("meta"):  # shapes only, no storage
        model = Transformer(cfg)
    names = set(weights.where)
    prefix = _detect_prefix(names, "wte", ("transformer.", "")) if cfg.position == "learned" else \
        _detect_prefix(names, "embed_tokens", ("model.", ""))
    slots = tensor_map(model, prefix)
    tied = cfg.tie_embeddings and cfg.head == "lm"  # a scalar head has no LM head to tie
    check_weights(weights, slots, tied)
    dtype = dtype or weights.dtype(slots[0].sources[0])  # the embedding table's: the checkpoint's dtype
    scratch = Scratch()
    state = {slot.name: _build(slot, weights, dtype, device, scratch)
             for slot in _bar(slots, progress, "loading")}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    model._make_rope(device)
    model.to(dtype)  # the rope tables follow the weights' dtype, as in Transformer.load
    return model.eval()


def _build(slot: Slot, weights: HFWeights, dtype: torch.dtype, device, scratch: Scratch) -> torch.Tensor:
    """One llmlab tensor, allocated once where and as it will live and filled from its HF tensors: read
    straight in when nothing changes, else staged in `scratch` and copied (transposed / converted) into
    place."""
    out = torch.empty(slot.shape, dtype=dtype, device=device)
    if slot.op == "t":
        out.copy_(weights.view(slot.sources[0], scratch).t())
        return out
    parts = out.split(slot.splits()) if slot.op == "cat" else [out]  # q|k|v, gate|up: rows of one weight
    for rows, name in zip(parts, slot.sources, strict=True):
        weights.read_into(name, rows, scratch)
    return out


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


def save_hf(model: Transformer, path: str | Path, tokenizer=None) -> None:
    """Write PATH as a HF model directory: config.json, model.safetensors and, with a tokenizer,
    tokenizer.json, tokenizer_config.json and special_tokens_map.json (plus generation_config.json when the
    tokenizer has a chat template, see generation_config). PATH is written atomically (replaced whole).
    A scalar-head model (a reward model) is written as a *ForSequenceClassification model and needs the
    tokenizer for its padding id (module docstring)."""
    cfg = model.config
    dtype = model.tok_emb.weight.dtype
    _flavour(cfg)  # refuse early, before writing anything
    state = model.state_dict()
    with torch.device("meta"):  # what a plain Transformer of this config stores
        expected = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    odd = sorted(k for k in set(state) | set(expected) if k not in state or state[k].shape != expected.get(k))
    if odd:
        raise ModelError(f"cannot export: the model's tensor {odd[0]!r} is not that of a plain Transformer "
                         "(quantized or modified model?); export the unquantized checkpoint")
    slots = tensor_map(model, "transformer." if cfg.position == "learned" else "model.")
    specials = _special_ids(tokenizer)
    if cfg.head == "scalar":
        _check_reward_padding(tokenizer, specials)
    with atomic_dir(path) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config_to_hf(cfg, dtype, specials), indent=2) + "\n")
        write_safetensors(tmp / SAFETENSORS, _hf_tensors(slots, state), metadata={"producer": "llmlab"})
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.block_size)
        generation = generation_config(tokenizer) if cfg.head == "lm" else None
        if generation is not None:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def _check_reward_padding(tokenizer, specials: dict[str, int | None]) -> None:
    """ModelError unless a reward model's export gets a padding id that ends no sequence: transformers reads
    the score at the last token that is not pad_token_id, so without one it cannot score a padded batch, and
    with pad = eos it would read the token before the eos."""
    pad, eos = specials["pad_token_id"], specials["eos_token_id"]
    if tokenizer is not None and pad is not None and pad != eos:
        return
    why = "it comes without a tokenizer" if tokenizer is None else \
        "its tokenizer has no padding token" if pad is None else f"its tokenizer pads with its eos id {eos}"
    raise ModelError(f"cannot export the reward model (head 'scalar'): {why}, and transformers reads the "
                     "score at the last token that is not pad_token_id; export it with its tokenizer (not "
                     "--no-tokenizer), one with a pad token distinct from eos such as llmlab's <|pad|>")


def _hf_tensors(slots: list[Slot], state: dict[str, torch.Tensor]):
    """(HF name, shape, dtype, make) for each HF tensor; make() produces it when the writer reaches it."""
    for slot in slots:
        tensor = state[slot.name].detach()
        for i, (name, shape) in enumerate(zip(slot.sources, slot.hf_shapes(), strict=True)):
            yield name, shape, tensor.dtype, (lambda t=tensor, s=slot, i=i: s.split(t)[i])


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------

def load_hf_tokenizer(path: str | Path):
    """Tokenizer from PATH/tokenizer.json through Tokenizer.from_hf, or None when the directory has none.
    The model's Jinja chat template (tokenizer_config.json or chat_template.jinja) comes with it.

    llmlab's Tokenizer finds bos/eos/pad by token name (<|endoftext|>, </s>, <|end_of_text|>, ...). When
    tokenizer_config.json names a different eos token (instruct models: <|im_end|>, <|eot_id|>), a warning
    says which token plain generation will stop at; chats stop at tok.chat_template.stop_ids, which include
    the file's eos token.
    """
    from llmlab.tokenizer import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_JSON
    if not file.is_file():
        return None
    tok = Tokenizer.from_hf(file)
    _warn_on_eos_mismatch(tok, hf_special_tokens(path), path)
    return tok


def hf_special_tokens(path: str | Path) -> dict[str, str]:
    """{"bos": token, "eos": token, "pad": token} as tokenizer_config.json (else special_tokens_map.json)
    names them; roles the files leave empty are absent. Values may be strings or AddedToken objects
    ({"content": ..})."""
    roles: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # the later file wins, as in transformers
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file} is not valid JSON ({e}); re-download it or delete it") from e
        for role in ("bos", "eos", "pad"):
            value = data.get(f"{role}_token") if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
    return roles


def _warn_on_eos_mismatch(tok, roles: dict[str, str], path: Path) -> None:
    want = roles.get("eos")
    names = {i: s for s, i in tok.special_tokens.items()}
    have = names.get(tok.eos_id) if tok.eos_id is not None else None
    if want is not None and want != have and want in tok.special_tokens:
        import warnings

        warnings.warn(f"{path / TOKENIZER_CONFIG} names eos_token {want!r} but llmlab's Tokenizer resolves "
                      f"eos to {have!r} by name; generation stops at {have!r}, pass "
                      f"stop={tok.special_tokens[want]} to stop at the file's eos", stacklevel=3)


def save_hf_tokenizer(tokenizer, directory: str | Path, model_max_length: int | None = None) -> None:
    """tokenizer.json (Tokenizer.to_hf) + tokenizer_config.json + special_tokens_map.json in DIRECTORY, so
    that AutoTokenizer.from_pretrained loads a PreTrainedTokenizerFast that encodes exactly as llmlab does: no
    bos/eos added (llmlab's encode adds none), no clean-up of spaces on decode. The tokenizer's chat template
    (llmlab's, or the one an imported model came with, with the token names it reads) goes into
    tokenizer_config.json, so transformers' apply_chat_template gives llmlab's ids."""
    directory = Path(directory)
    tokenizer.to_hf(directory / TOKENIZER_JSON)
    names = {i: s for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])}
    roles = {f"{r}_token": names.get(getattr(tokenizer, f"{r}_id")) for r in ("bos", "eos", "pad")}
    chat = resolve_format(tokenizer.chat_format, tokenizer.special_tokens)
    if chat is not None:  # the names the template was rendered with win over llmlab's guesses by name
        specials = tokenizer.special_tokens
        roles.update({k: v for k, v in chat.variables.items() if k in roles and v in specials})
    others = [s for s in names.values() if s not in roles.values()]
    special_map = {**{k: v for k, v in roles.items() if v is not None}, "additional_special_tokens": others}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "additional_special_tokens": others,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              **({"model_max_length": model_max_length} if model_max_length else {}),
              **({"chat_template": chat.template} if chat is not None else {})}
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def generation_config(tokenizer) -> dict[str, Any] | None:
    """generation_config.json for a tokenizer that chats (the one whose template save_hf_tokenizer exports),
    else None. transformers' generate stops at any of eos_token_id, so the template's stop ids (end of turn
    first) go there: an assistant's reply ends with the end-of-turn token, often not the tokenizer's eos."""
    if tokenizer is None or resolve_format(tokenizer.chat_format, tokenizer.special_tokens) is None:
        return None
    chat = tokenizer.chat_template
    pad = chat.pad_id if chat.pad_id is not None else tokenizer.pad_id
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(chat.stop_ids), "pad_token_id": pad}
    return {k: v for k, v in ids.items() if v is not None}


def _special_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id}


# ----------------------------------------------------------------------------------------------------------
# the CLI's two verbs
# ----------------------------------------------------------------------------------------------------------

def import_hf(src: str | Path, out: str | Path, dtype: str | None = None, tokenizer: bool = True,
              overwrite: bool = False) -> dict:
    """`llmlab import-hf`: HF directory -> llmlab checkpoint OUT (config.json, model.safetensors, tokenizer/).
    OUT follows llmlab.fsutil.check_output: a non-empty OUT is replaced only with `overwrite`, never SRC."""
    check_output(out, inputs=[src], overwrite=overwrite)
    model, tok = load_hf(src, dtype=dtype, tokenizer=tokenizer, progress=True)
    with atomic_dir(out) as tmp:
        model.save_into(tmp)
        if tok is not None:
            tok.save(tmp / "tokenizer")
    return _summary(read_hf_config(src)["model_type"], model, tok)


def _summary(model_type: str, model: Transformer, tok) -> dict:
    return {"model_type": model_type, "head": model.config.head, "params": model.num_params(),
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."), "tokenizer": tok is not None}


def export_hf(ckpt: str | Path, out: str | Path, dtype: str | None = None,
              tokenizer: str | Path | None = None, with_tokenizer: bool = True,
              overwrite: bool = False) -> dict:
    """`llmlab export-hf`: llmlab checkpoint -> HF directory OUT (tokenizer from CKPT/tokenizer unless given).
    OUT follows llmlab.fsutil.check_output: a non-empty OUT is replaced only with `overwrite`, never CKPT."""
    from llmlab.tokenizer import Tokenizer

    check_output(out, inputs=[ckpt, tokenizer], overwrite=overwrite)
    ckpt = Path(ckpt)
    model = Transformer.load(ckpt, dtype=dtype, prepare=lambda _, meta: _refuse_extended(ckpt, meta))
    tok = None
    if with_tokenizer:
        tok_dir = Path(tokenizer) if tokenizer is not None else ckpt / "tokenizer"
        if tokenizer is not None or tok_dir.is_dir():
            tok = Tokenizer.load(tok_dir)
        if tokenizer is not None:  # the copy shipped with OUT must be the model's own
            require_same_tokenizer(checkpoint_tokenizer(ckpt, model.config.vocab_size),
                                   directory_tokenizer(tok_dir, tok), "export with the model's tokenizer "
                                   "(omit --tokenizer to use CKPT/tokenizer)")
    save_hf(model, out, tokenizer=tok)
    return _summary(hf_model_type(model.config), model, tok)


def _refuse_extended(ckpt: Path, meta: dict) -> None:
    """A HF directory holds a plain Transformer's weights: a quantized (or otherwise extended) checkpoint has
    other tensors, and dequantizing would ship weights the user never had."""
    for key in EXTENSIONS:
        if meta.get(key):
            raise ModelError(f"cannot export {ckpt}: its config.json has a {key!r} entry ({meta[key]}), so "
                             "its layers are not a plain Transformer's; export the full-precision checkpoint")
