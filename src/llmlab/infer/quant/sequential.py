"""Walking a Transformer block by block on calibration data (shared by GPTQ and AWQ).

Both methods quantize layers in order and want each layer's inputs as the *already-quantized* model
produces them, so errors made early are seen (and partly compensated) later. Rather than re-running the
whole model per layer, the inputs of block 0 are captured once (a forward pre-hook that stops the forward),
then each block is run on the stored activations, and its outputs -- computed after its layers have been
quantized -- become the next block's inputs. Inside a block, forward hooks on the linear layers collect what
each method needs (a Hessian, activation statistics), and stop the forward early when nothing later in the
block is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are collected."""


def batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int):
    """-> (list of block-0 inputs [b, T, d], one per calibration batch; the rope tables the blocks get)."""
    xs, rope = [], [None]

    def grab(_module, args):
        xs.append(args[0].detach())
        rope[0] = args[1]
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(grab)
    try:
        for ids in batches(calib, batch_size):
            try:
                model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return xs, rope[0]


@torch.no_grad()
def run_block(block: nn.Module, xs: list[torch.Tensor], rope) -> list[torch.Tensor]:
    """The block's outputs for every stored input batch (no KV cache: full causal attention)."""
    return [block(x, rope, None, None) for x in xs]


@torch.no_grad()
def feed_inputs(block: nn.Module, xs: list[torch.Tensor], rope, watch: dict[str, nn.Module],
                fn: Callable[[str, torch.Tensor], None], stop_at: nn.Module | None = None) -> None:
    """Run the block on every batch, calling fn(name, input) for each watched module's input; the forward
    stops right after `stop_at` has seen its input."""
    handles = []
    for name, module in watch.items():
        def hook(mod, args, name=name):
            fn(name, args[0].detach())
            if mod is stop_at:
                raise _Stop
        handles.append(module.register_forward_pre_hook(hook))
    try:
        for x in xs:
            try:
                block(x, rope, None, None)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block's nn.Linear layers in registration order (= execution order: qkv, proj, fc, proj)."""
    return [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
