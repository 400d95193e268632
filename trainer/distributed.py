"""Process-group setup/teardown, collectives, gradient-sync control, and the device rule."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass


import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")  # trainer.device and the tools' device=


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
    """Whether torchrun (or another launcher setting RANK/WORLD_SIZE) started this process."""
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
    """Element-wise max of `t` over ranks, in place (a no-op in one process)."""
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Element-wise sum of `t` over ranks, in place (a no-op in one process)."""
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under a DDP / compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows of `t` (B_local, D), concatenated in rank order -> (B_global, D).

    Not differentiable; every rank must pass the same B_local.
    """
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def grad_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the `last` micro-batch (DDP `no_sync`, FSDP2's
    `set_requires_gradient_sync`); a no-op for an unwrapped model."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    if not last and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """The device for `trainer.device` / a tool's `device=`: auto (CUDA when present, else CPU),
    cpu or cuda (this rank's GPU). Raises ConfigError for cuda without a GPU or another value."""
    if kind not in DEVICES:
        raise ConfigError(f"device={kind!r} is not valid; choose one of: {', '.join(DEVICES)}.")
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; use cpu or auto.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
