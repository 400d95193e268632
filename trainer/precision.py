"""Precision: the dtype table, the autocast context, and the fp16 GradScaler."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = tuple(DTYPES)  # precision=<dtype>


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Mixed-precision context for forward passes: matmuls in bf16/fp16, reductions in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def build_scaler(precision: str, device: torch.device, init_scale: float = 65536.0) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=precision == "fp16")
