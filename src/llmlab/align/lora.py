"""LoRA: low-rank adapters on the attention and MLP linears (Hu et al. 2021, arXiv:2106.09685).

A target linear y = W x + b becomes y = W x + b + (alpha / r) * B A dropout(x), with A [r, in] drawn like
a linear layer's weight and B [out, r] zero, so a fresh adapter changes nothing. Only A and B train; W, the
embeddings, the norms and the head are frozen. `merge_lora` folds W += (alpha / r) B A back into plain
nn.Linear modules (same names, so a merged model saves and loads as an ordinary Transformer);
`adapters_disabled(model)` switches every adapter off for the duration of a `with` block, which is how DPO
gets its reference model from the same weights without a second copy.

A LoRA checkpoint holds only the adapters: `model.safetensors` has the lora_A/lora_B tensors and
`config.json` is the model config plus a "lora" entry (rank, alpha, dropout, targets and the base checkpoint
the adapters sit on). `LoRACheckpointer` writes and reads that layout inside the trainer's checkpoints;
`load_lora(path)` rebuilds base + adapters (merged on request) from it.

Targets are named by the module paths inside each block: attn.qkv, attn.proj, mlp.fc, mlp.proj.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import Fraction, NonNegativeInt, PositiveFloat, check_config, from_dict
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.transformer import CONFIG_FILE, WEIGHTS_FILE, Transformer, read_meta, read_weights
from llmlab.train.checkpoint import Checkpointer, unwrap

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
META_KEY = "lora"  # the config.json entry that marks an adapter-only checkpoint


@dataclass
class LoRAConfig:
    """Adapter settings; rank 0 means no adapters (full fine-tuning)."""

    rank: NonNegativeInt = 0        # r: the adapters' inner dimension (0: LoRA off)
    alpha: PositiveFloat = 16.0     # the update is scaled by alpha / rank
    dropout: Fraction = 0.0         # dropout on the adapters' input while training
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # any of attn.qkv, attn.proj, mlp.fc,
                                                                        # mlp.proj
    merge: bool = True              # after training, also write RUN_DIR/merged (a plain full checkpoint)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self) -> None:
        """The rule between fields (check_config calls it): every target is a known one."""
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            bad = unknown[0] if unknown else "nothing"
            raise ConfigError(f"lora.targets={self.targets!r} names {bad!r}; choose among {list(TARGETS)}")


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias parameters, same names) plus a low-rank update B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kind = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kind))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kind))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.scaling = alpha / rank
        self.dropout = dropout
        self.adapter_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return y
        h = F.dropout(x, self.dropout) if self.training and self.dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A, sharing nothing with the adapter."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            weight = (self.weight.float() + delta).to(self.weight.dtype)
        kind = {"device": weight.device, "dtype": weight.dtype}
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **kind)
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _targets(model: nn.Module, targets: list[str]) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every block linear whose path ends with one of `targets`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets):
            parent_name, _, attr = name.rpartition(".")
            yield model.get_submodule(parent_name), attr, module


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter and put adapters on the target linears, in place; returns the model."""
    cfg = check_config(cfg, "lora.")
    if not cfg.enabled:
        raise ConfigError("lora.rank=0 means no adapters; set lora.rank to a positive rank, e.g. 8")
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; merge them (merge_lora) before adding more")
    for p in model.parameters():
        p.requires_grad_(False)
    found = list(_targets(model, cfg.targets))
    if not found:
        raise ConfigError(f"lora.targets={cfg.targets!r} match no linear layer of this model; "
                          f"choose among {list(TARGETS)}")
    for parent, attr, linear in found:
        setattr(parent, attr, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear (W += alpha/r B A), in place; returns the plain model."""
    module = unwrap(model)
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, sub.merged())
    if hasattr(module, "lora_config"):
        del module.lora_config
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes as its base (every adapter off); restored on exit."""
    modules = lora_modules(model)
    before = [m.adapter_on for m in modules]
    for m in modules:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m, on in zip(modules, before, strict=True):
            m.adapter_on = on


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (names as in the model's state dict)."""
    return {k: v.detach().contiguous() for k, v in unwrap(model).state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


# ---------------------------------------------------------------- adapter-only checkpoints

def write_lora(model: nn.Module, directory: Path, base: str | Path) -> None:
    """Write config.json (model config + the "lora" entry) and model.safetensors (adapters only)."""
    from safetensors.torch import save_file

    module = unwrap(model)
    cfg = module.lora_config
    meta = {**dataclasses.asdict(module.config),
            META_KEY: {**dataclasses.asdict(cfg), "base": str(Path(base).resolve())}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(lora_state_dict(module), str(directory / WEIGHTS_FILE),
              metadata={"format": "pt", "producer": "llmlab", "content": "lora"})


def read_lora_meta(path: str | Path) -> dict:
    """The "lora" entry of an adapter checkpoint's config.json (CheckpointError if it is not one)."""
    path = Path(path)
    entry = read_meta(path).get(META_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("base"), str):
        raise CheckpointError(f"{path / CONFIG_FILE} has no {META_KEY!r} entry naming its base checkpoint; "
                              "it is not a LoRA checkpoint (load it with Transformer.load)")
    return entry


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Copy an adapter checkpoint's tensors into a model that has the same adapters (CheckpointError if the
    set of tensors or a shape differs)."""
    path = Path(path)
    file = path / WEIGHTS_FILE
    state = read_weights(file)
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        name = sorted(set(state) ^ set(expected))[0]
        raise CheckpointError(f"{file}: adapter tensor {name!r} is missing or unexpected; the checkpoint's "
                              "lora settings do not match this model's (lora.rank / lora.targets)")
    for name, t in expected.items():
        if state[name].shape != t.shape:
            raise CheckpointError(f"{file}: adapter {name!r} has shape {tuple(state[name].shape)}, the model "
                                  f"needs {tuple(t.shape)}; set lora.rank to the checkpoint's rank")
    unwrap(model).load_state_dict(state, strict=False)


def load_lora(path: str | Path, device: str | torch.device = "cpu", merge: bool = False,
              base_loader=None) -> Transformer:
    """Base checkpoint (from the "lora" entry) + the adapters at `path`; merged into plain linears with
    `merge`. `base_loader(base_path, meta)` may replace Transformer.load (e.g. to grow the vocabulary the
    way the run did); its result must match the checkpoint's model config."""
    path = Path(path)
    entry = read_lora_meta(path)
    base = Path(entry["base"])
    model = base_loader(base, read_meta(path)) if base_loader else Transformer.load(base, device=device)
    stored = {k: v for k, v in read_meta(path).items() if k != META_KEY}
    ours = json.loads(json.dumps(dataclasses.asdict(model.config)))
    if stored != ours:
        key = next((k for k in ours if stored.get(k) != ours[k]), sorted(set(stored) - set(ours))[0])
        raise CheckpointError(f"{path / CONFIG_FILE} says model.{key}={stored.get(key)!r} but its base "
                              f"{base} has {ours.get(key)!r}; the base checkpoint changed since the adapters "
                              "were trained")
    try:
        cfg = check_config(from_dict(LoRAConfig, {k: v for k, v in entry.items() if k != "base"}))
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    apply_lora(model, cfg)
    load_adapters(model, path)
    model.to(device)
    return merge_lora(model) if merge else model


class LoRACheckpointer(Checkpointer):
    """The trainer's checkpoints with adapter-only weights: everything else (train_state.pt, tokenizer/,
    pruning, best.json) as for a full model."""

    def __init__(self, *args, base: str | Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.base = Path(base)

    def write_model(self, model: nn.Module, directory: Path) -> None:
        write_lora(model, directory, self.base)

    def read_model(self, model: nn.Module, directory: Path) -> None:
        entry = read_lora_meta(directory)
        if Path(entry["base"]) != self.base.resolve():
            raise CheckpointError(f"{Path(directory) / CONFIG_FILE} holds adapters for base {entry['base']}, "
                                  f"not {self.base.resolve()}; resume with the run's own base checkpoint")
        load_adapters(model, directory)
