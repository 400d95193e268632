"""The checkpoint side of tensor parallelism: packed projections ([q; k; v], SwiGLU's [gate; value],
cross-attention's [k; v]) are sharded in a reordered row order (`packed_order`, see
`trainer.transforms.tensor_parallel`); these functions convert them, and their optimizer moments,
to the model's own row order and back, so a TP checkpoint is the same DCP layout as an FSDP or
single-process one and resumes under either (and back). Each conversion gathers one tensor at a
time (`full_tensor`), so a save or load holds at most one full packed matrix at once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

PACKED_ATTR = "_tp_packed"  # on the model: {parameter name: (row sizes of its parts, TP ranks)}


def packed_order(parts: list[int], n: int) -> torch.Tensor:
    """Row permutation putting chunk r (of n) of every part next to each other.

    Args:
        parts: row counts of the stacked parts, e.g. [H*Dh, Hkv*Dh, Hkv*Dh]; each divisible by n.
        n: tensor-parallel ranks.
    Returns:
        perm (sum(parts),) int64: row i of the reordered weight is row perm[i] of the original.
    """
    starts = [sum(parts[:i]) for i in range(len(parts))]
    pieces = []
    for r in range(n):
        for start, size in zip(starts, parts):
            k = size // n
            pieces.append(torch.arange(start + r * k, start + (r + 1) * k))
    return torch.cat(pieces)


def _to_model_rows(full: torch.Tensor, parts: list[int], n: int) -> torch.Tensor:
    """A whole packed tensor in the TP row order -> the model's row order (inverse of `packed_order`)."""
    out = torch.empty_like(full)
    out[packed_order(parts, n)] = full
    return out


def tp_rows(model: nn.Module, fqn: str, t: torch.Tensor) -> torch.Tensor:
    """Whole tensor `fqn` of the model (a weight or its optimizer moment) in the TP row order:
    reordered when `fqn` is packed and `t` has rows, else `t` itself."""
    found = getattr(model, PACKED_ATTR, {}).get(fqn)
    return t[packed_order(*found)] if found is not None and t.dim() > 0 else t


def _world_mesh(device_type: str):
    """A 1-D mesh of every rank (the canonical layout's), made once per process group."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (dist.group.WORLD, device_type)  # a multirun's next job has a new default group
    if _MESHES.get("key") != key:
        _MESHES.update(key=key, mesh=init_device_mesh(device_type, (dist.get_world_size(),)))
    return _MESHES["mesh"]


_MESHES: dict = {}


def _convert(t, parts: list[int], n: int, like=None):
    """One packed DTensor between the TP row order and the model's, gathered once and reordered:
    to the model's order sharded by rows over every rank (`like` None), or back to the TP order
    in `like`'s mesh and placements."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    full = t.full_tensor()
    if like is None:
        canon = _to_model_rows(full, parts, n)
        return distribute_tensor(canon, _world_mesh(full.device.type), [Shard(0)], src_data_rank=None)
    mesh = like.device_mesh
    rep = DTensor.from_local(full[packed_order(parts, n)], mesh, [Replicate()] * mesh.ndim, run_check=False)
    return rep.redistribute(mesh, like.placements)


def _optim_entries(optim_state: dict, fqn: str):
    state = optim_state.get(fqn, {})
    return [(k, v) for k, v in state.items() if hasattr(v, "full_tensor") and v.dim() > 0]


def to_canonical(model: nn.Module, model_sd: dict, optim_state: dict) -> None:
    """Replace, in place, each packed tensor of a TP state (weights and their optimizer moments)
    by the same values in the model's own row order, sharded by rows over every rank."""
    for fqn, (parts, n) in getattr(model, PACKED_ATTR, {}).items():
        model_sd[fqn] = _convert(model_sd[fqn], parts, n)
        for k, v in _optim_entries(optim_state, fqn):
            optim_state[fqn] = {**optim_state[fqn], k: _convert(v, parts, n)}  # the live state stays as is


def canonical_buffers(model: nn.Module, model_sd: dict, optim_state: dict) -> dict:
    """Before a DCP load into a TP model: swap each packed entry for an empty tensor in the
    model's row order (what the checkpoint holds). Returns {(fqn, key or None): the live tensor}."""
    from torch.distributed.tensor import Shard, distribute_tensor

    live = {}
    for fqn in getattr(model, PACKED_ATTR, {}):
        entries = [(None, model_sd[fqn])] + _optim_entries(optim_state, fqn)
        for key, t in entries:
            live[(fqn, key)] = t
            buf = distribute_tensor(torch.zeros(t.shape, dtype=t.dtype, device=t.device_mesh.device_type),
                                    _world_mesh(t.device_mesh.device_type), [Shard(0)], src_data_rank=None)
            if key is None:
                model_sd[fqn] = buf
            else:
                optim_state[fqn] = {**optim_state[fqn], key: buf}  # the live state stays as is
    return live


def from_canonical(model: nn.Module, model_sd: dict, optim_state: dict, live: dict) -> None:
    """After the DCP load: put each loaded packed tensor back in the TP row order and layout."""
    for (fqn, key), like in live.items():
        parts, n = getattr(model, PACKED_ATTR)[fqn]
        if key is None:
            model_sd[fqn] = _convert(model_sd[fqn], parts, n, like=like)
        else:
            optim_state[fqn] = {**optim_state[fqn], key: _convert(optim_state[fqn][key], parts, n, like=like)}


def full_to_tp_order(model: nn.Module, full_sd: dict) -> dict:
    """A full state_dict in the model's row order (a `.pt` checkpoint) -> the TP row order, so
    `set_state_dict(..., full_state_dict=True)` can hand each rank its chunk."""
    return {k: tp_rows(model, k, v) for k, v in full_sd.items()}


def full_to_model_order(model: nn.Module, full_sd: dict) -> dict:
    """The inverse of `full_to_tp_order` (final weights gathered from a TP model)."""
    out = dict(full_sd)
    for fqn, (parts, n) in getattr(model, PACKED_ATTR, {}).items():
        if fqn in out:
            out[fqn] = _to_model_rows(out[fqn], parts, n)
    return out
