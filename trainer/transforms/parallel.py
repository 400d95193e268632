"""Data parallelism as a model transform: DDP, or FSDP2 (ZeRO-3) sharding per block."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist

PARALLELS = ("single", "ddp", "fsdp")  # parallel=<kind>


def apply_parallel(model: nn.Module, kind: str, device: torch.device, d: Dist) -> nn.Module:
    """Wrap the model for data parallelism.

    ddp: DistributedDataParallel (gradients all-reduced in buckets during backward).
    fsdp: FSDP2 `fully_shard` per block, then the root: parameters, gradients and optimizer
    state are sharded across ranks (ZeRO-3); each block's weights are gathered just in time.
    """
    if kind == "single" or d.world_size == 1 and kind == "ddp":
        return model
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for stack in (model.encoder, model.decoder):
        if stack is not None:
            for block in stack.blocks:
                fully_shard(block)
    fully_shard(model)
    return model
