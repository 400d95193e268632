"""Model transforms, applied in one place and one order (torchtitan's `parallelize`).

QAT (fake-quantized linears, so the wrappers below see the final modules) -> device -> compile
(regional, each block in place) -> data parallelism (DDP or FSDP2). Every transform takes a model
and returns it; the loop sees only the result.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist
from trainer.quantize import apply_qat
from trainer.transforms.compile import apply_compile
from trainer.transforms.parallel import apply_parallel


def apply_transforms(model: nn.Module, cfg, device: torch.device, d: Dist) -> nn.Module:
    """Apply `cfg.quantize` (QAT), move to `device`, then `cfg.trainer.compile` and `cfg.parallel`.

    Args:
        model: the built (and possibly initialised) model. cfg: the run config (only its
            quantize, trainer.compile and parallel sub-configs are read). d: this process's place.
    Returns:
        The model to train (wrapped by DDP, or sharded in place by FSDP2).
    """
    model = apply_qat(model, cfg.quantize)
    model.to(device)
    model = apply_compile(model, cfg.trainer.compile)
    return apply_parallel(model, cfg.parallel.kind, device, d)
