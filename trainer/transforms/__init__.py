"""Model transforms, applied in one place and one order (torchtitan's `parallelize`).

QAT (fake-quantized linears, so the wrappers below see the final modules) -> device -> activation
checkpointing -> compile (regional, each block in place) -> parallelism (DDP or FSDP2, with
FSDP2's mixed-precision policy; tensor parallel, FSDP x TP, or pipeline stages). Every transform takes a model and returns it; the loop sees only
the result.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist
from trainer.quantize import apply_qat
from trainer.transforms.checkpointing import apply_activation_checkpointing
from trainer.transforms.compile import apply_compile, compile_enabled
from trainer.transforms.parallel import apply_parallel


def apply_transforms(model: nn.Module, cfg, device: torch.device, d: Dist) -> nn.Module:
    """Apply `cfg.quantize` (QAT), move to `device`, then `cfg.trainer.activation_checkpointing`,
    `cfg.trainer.compile` and `cfg.parallel` (with `cfg.precision.dtype` for FSDP2's policy).

    Args:
        model: the built (and possibly initialised) model. cfg: the run config (only its
            quantize, trainer, precision and parallel sub-configs are read). d: this process's place.
    Returns:
        The model to train (wrapped by DDP, or sharded in place by FSDP2).
    """
    model = apply_qat(model, cfg.quantize)
    model.to(device)
    t = cfg.trainer
    model = apply_activation_checkpointing(model, t.get("activation_checkpointing", "none"), t.get("ac_every", 2))
    model = apply_compile(model, compile_enabled(t.compile, device))
    par = cfg.parallel
    return apply_parallel(model, par.kind, device, d, cfg.precision.dtype, tp_size=par.get("tp_size"),
                          grad_accum=t.grad_accum, pp_schedule=par.get("pp_schedule", "gpipe"))
