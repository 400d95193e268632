"""Data parallelism as a model transform: DDP, or FSDP2 (ZeRO-3) sharding per block, with FSDP2's
mixed-precision policy under precision=bf16|fp16."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist

PARALLELS = ("single", "ddp", "fsdp")  # parallel=<kind>
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_mixed_precision(precision: str):
    """FSDP2's `MixedPrecisionPolicy` for `precision` (fp32 | bf16 | fp16), or None for fp32.

    bf16/fp16: each block's parameters are all-gathered and computed in the low dtype
    (`param_dtype`) while the sharded fp32 parameters, their gradients and the optimizer state stay
    fp32; gradients are reduce-scattered in fp32 (`reduce_dtype`), so the sum over ranks does not
    round to 8 (bf16) or 11 (fp16) mantissa bits.
    """
    if precision not in _LOW:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=_LOW[precision], reduce_dtype=torch.float32)


def apply_parallel(model: nn.Module, kind: str, device: torch.device, d: Dist, precision: str = "fp32") -> nn.Module:
    """Wrap the model for data parallelism.

    ddp: DistributedDataParallel (gradients all-reduced in buckets during backward).
    fsdp: FSDP2 `fully_shard` per block, then the root: parameters, gradients and optimizer
    state are sharded across ranks (ZeRO-3); each block's weights are gathered just in time, in
    the low dtype under precision=bf16|fp16 (`fsdp_mixed_precision`).
    """
    if kind == "single" or d.world_size == 1 and kind == "ddp":
        return model
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_mixed_precision(precision)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for stack in (model.encoder, model.decoder):
        if stack is not None:
            for block in stack.blocks:
                fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
