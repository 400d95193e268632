"""Regional compilation: `torch.compile` applied to each transformer block, not the whole model.

The same recipe as torchtitan's `apply_compile`: every block of a stack runs the same code, so
dynamo traces one block once and every other block reuses that graph (parameters are graph
inputs), which keeps compile time at one block's worth however deep the model is, and leaves
the embedding, position tables, LM head and loss eager (cheap, and free to vary per objective).
`nn.Module.compile()` compiles in place, so parameter names, state_dicts, checkpoints, DDP/FSDP
wrapping and `decay_parameters` see the uncompiled module tree.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from models.blocks import Block

def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks `apply_compile` compiles (every block of every stack), in order."""

    return [m for m in model.modules() if isinstance(m, Block)]

COMPILE_CHOICES = ("auto", "true", "false")  # trainer.compile

def compile_enabled(choice: str | bool, device: torch.device) -> bool:
    """Whether `trainer.compile=<choice>` compiles on `device`: true, false, or auto = on CUDA only.

    auto keeps eager on CPU, where regional compile measured no step-time gain for the default
    sizes (docs/benchmarks/compile_*.md), and compiles on GPUs, where it fuses the launch-bound
    elementwise work (docs/performance.md). Raises ValueError for another value.
    """
    value = str(choice).lower()
    if value not in COMPILE_CHOICES:
        raise ValueError(f"trainer.compile={choice!r} is not valid; choose one of: {', '.join(COMPILE_CHOICES)}.")
    return value == "true" or (value == "auto" and device.type == "cuda")

def apply_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """Compile each transformer block in place (regional compile); returns `model` itself.

    Args:
        model: a `models.transformer.Transformer` (already on its device, before DDP/FSDP).
        enabled: `cfg.trainer.compile`; False returns the model untouched.

    Graphs are cached per process by dynamo: call `reset_compile()` when a run ends so that a
    multirun's next job (other sizes, other components) does not pile up guards and recompiles.
    """
    if not enabled:
        return model
    for block in compiled_blocks(model):
        block.compile()
    return model

def reset_compile() -> None:
    """Drop every compiled graph and guard of this process (`torch._dynamo.reset`)."""
    torch._dynamo.reset()
