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
    """Where this process sits: rank, world size, device; `owns_group` if we created the group.

    `copies`: how many consecutive ranks hold pieces of one model replica and so see the same rows
    of every batch (tensor / pipeline parallelism; 1 for data parallelism). Ranks are numbered
    replica-major: rank = dp_rank * copies + (position within the replica).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    owns_group: bool = False
    copies: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which share of the global batch it trains on."""
        return self.rank // self.copies

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the number of shares the global batch is cut into."""
        return self.world_size // self.copies

    @property
    def counts(self) -> bool:
        """Whether this rank's sums enter a reduction over every rank (one rank per replica)."""
        return self.rank % self.copies == 0


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
    """The user's model under a DDP / compile / pipeline-stage wrapper."""
    model = getattr(model, "_orig_mod", model)
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or getattr(model, "wraps_module", False)
    return model.module if wrapped else model


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `model` to a global L2 norm of `max_norm` (inf: measure only);
    returns the norm before clipping, the same on every rank.

    Unsharded, DDP and FSDP: `torch.nn.utils.clip_grad_norm_`. Tensor parallel (DTensor shards next
    to replicated plain tensors): the sharded gradients' norm is reduced over the mesh, the
    replicated ones counted once. Pipeline stages: each stage's squared norm (a parameter held by
    several stages counted once, `grad_norm_params`) summed over the stages.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    counted = getattr(model, "grad_norm_params", None)
    groups: dict = {}  # one group per device mesh (None: plain tensors)
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    if counted is None and len(groups) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if counted is not None:  # pipeline stages: plain tensors, a shared parameter counted once
        ids = {id(p) for p in counted()}
        counted_groups = {None: [p.grad for p in params if id(p) in ids]}
    else:
        counted_groups = groups
    sq = torch.zeros((), dtype=torch.float32, device=params[0].grad.device if params else "cpu")
    for grads in counted_groups.values():
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            sq = sq + (n.full_tensor() if hasattr(n, "full_tensor") else n).float().square()
    if counted is not None and dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return norm


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
