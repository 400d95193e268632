"""Parallelism as a model transform: data parallel (DDP, or FSDP2 (ZeRO-3) sharding per block, with
FSDP2's mixed-precision policy under precision=bf16|fp16), tensor parallel (`tp`), both on a 2-D
mesh (`fsdp_tp`: FSDP across the mesh's rows, TP within each row, torchtitan's layout), and
pipeline parallel (`pp`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist
from trainer.transforms.pipeline import apply_pipeline
from trainer.transforms.tensor_parallel import apply_tensor_parallel

PARALLELS = ("single", "ddp", "fsdp", "tp", "fsdp_tp", "pp")  # parallel=<kind>
SHARDED = ("fsdp", "tp", "fsdp_tp", "pp")  # kinds whose checkpoints are DCP directories
MODEL_PARALLEL = ("tp", "fsdp_tp", "pp")  # kinds where several ranks hold pieces of one model replica


def model_copies(kind: str, tp_size: int | None, world_size: int) -> int:
    """How many ranks share one replica of the model (and so see the same rows of every batch):
    tp and pp use every rank, fsdp_tp `tp_size` (default 2), data parallelism 1."""
    if kind in ("tp", "pp"):
        return world_size
    if kind == "fsdp_tp":
        return tp_size or 2
    return 1
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


def apply_parallel(model: nn.Module, kind: str, device: torch.device, d: Dist, precision: str = "fp32", *,
                   tp_size: int | None = None, grad_accum: int = 1, pp_schedule: str = "gpipe") -> nn.Module:
    """Wrap or shard the model for `parallel=<kind>` over every rank of the default group.

    ddp: DistributedDataParallel (gradients all-reduced in buckets during backward).
    fsdp: FSDP2 `fully_shard` per block, then the root: parameters, gradients and optimizer
    state are sharded across ranks (ZeRO-3); each block's weights are gathered just in time, in
    the low dtype under precision=bf16|fp16 (`fsdp_mixed_precision`).
    tp: every block's attention and feed-forward column/row-parallel over all ranks
    (`transforms.tensor_parallel`). fsdp_tp: a (world / tp_size, tp_size) mesh, TP along its
    rows and FSDP2 across them. pp: one pipeline stage per rank (`transforms.pipeline`), trained
    over `grad_accum` micro-batches with the `pp_schedule` schedule.
    """
    if kind == "single" or d.world_size == 1 and kind == "ddp":
        return model
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if kind == "pp":
        return apply_pipeline(model, device, grad_accum, pp_schedule)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if kind == "tp":
        return apply_tensor_parallel(model, init_device_mesh(device.type, (d.world_size,), mesh_dim_names=("tp",)))
    policy = fsdp_mixed_precision(precision)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    if kind == "fsdp_tp":
        tp = model_copies(kind, tp_size, d.world_size)
        mesh = init_device_mesh(device.type, (d.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        kwargs["mesh"] = mesh["dp"]
    for stack in (model.encoder, model.decoder):
        if stack is not None:
            for block in stack.blocks:
                fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
