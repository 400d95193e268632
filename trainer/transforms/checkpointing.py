"""Activation checkpointing as a model transform: a block's activations are not kept for the
backward pass but recomputed from its input when the gradient reaches it (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost"; torchtitan's `apply_ac`).

`full` recomputes every transformer block, `selective` every `ac_every`-th block of each stack
(torchtitan's layer-selective AC): memory for the activations inside a block is traded for one more
forward of it. `torch.utils.checkpoint` runs non-reentrant with `preserve_rng_state=True`, so
dropout replays the same mask and losses and gradients equal the run without it. The block's own
`forward` is wrapped in place, so parameter names, state_dicts, checkpoints, compile (applied after)
and DDP/FSDP wrapping (applied last) see the same module tree.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from models.blocks import Block

AC_MODES = ("none", "full", "selective")  # trainer.activation_checkpointing=<mode>

def checkpointed_blocks(model: nn.Module, mode: str, every: int = 2) -> list[nn.Module]:
    """The blocks `apply_activation_checkpointing` wraps: none, every block (`full`), or blocks
    0, every, 2*every, ... of each stack (`selective`)."""

    if mode == "none":
        return []
    out = []
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        blocks = [m for m in (stack.modules() if stack is not None else ()) if isinstance(m, Block)]
        out += [b for i, b in enumerate(blocks) if mode == "full" or i % every == 0]
    return out

def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation: nothing is kept for a backward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return run

def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Recompute the chosen blocks' activations in backward (`checkpointed_blocks`); returns `model`.

    Args:
        model: a `models.transformer.Transformer`, before compile and DDP/FSDP.
        mode: `trainer.activation_checkpointing`: none | full | selective.
        every: `trainer.ac_every`, the stride of `selective` (>= 1).
    Raises:
        ValueError: an unknown mode.
    """
    if mode not in AC_MODES:
        raise ValueError(f"trainer.activation_checkpointing={mode!r} is not valid; choose one of: "
                         f"{', '.join(AC_MODES)}.")
    for block in checkpointed_blocks(model, mode, every):
        block.forward = _checkpointed(block.forward)  # an instance attribute: nn.Module.__call__ uses it
    return model
