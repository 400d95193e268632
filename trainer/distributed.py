"""Process-group setup/teardown, rank helpers, and the DDP / FSDP wrapping transforms."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    """Where this process sits: rank, world size, device; `owns_group` if we created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_distributed(device_kind: str, timeout_s: int) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); no-op otherwise."""
    if not launched_by_torchrun():
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return Dist(rank=rank, world_size=world, local_rank=local, launched=True, owns_group=owns)


def teardown(d: Dist) -> None:
    """Destroy the group we created (a multirun in one process must not inherit it)."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under a DDP / compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
