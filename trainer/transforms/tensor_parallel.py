"""Tensor (model) parallelism as a model transform: Megatron-style column/row-parallel attention and
feed-forward through `torch.distributed.tensor.parallel` (Shoeybi et al. 2019, "Megatron-LM";
torchtitan's `apply_tp`), and the checkpoint layout that lets a TP run resume under any other.

Per block, on a 1-D mesh of n ranks: the fused QKV (and cross-attention's Q and KV) and the
feed-forward's up projection are column-parallel (`ColwiseParallel`: each rank holds 1/n of the
output rows, i.e. H/n query heads, Hkv/n kv heads, d_ff/n hidden units, and computes them from the
full input); the attention's output and the feed-forward's down projection are row-parallel
(`RowwiseParallel`: each rank multiplies its slice and the partial sums are all-reduced). So a
block costs two all-reduces forward and two backward, and attention runs on each rank's own heads.
Embeddings, norms and the tied head stay replicated (every rank computes them on the same rows).

Packed weights: a fused projection stacks parts row-wise ([q; k; v], SwiGLU's [gate; value],
cross-attention's [k; v]); an even row split would hand rank 0 all of q and part of k. So before
sharding the rows are reordered (`packed_order`) so that rank r's contiguous chunk is
[q_r; k_r; v_r]. Checkpoints never see that order (`trainer.runs.tp_layout`).

Parameters used on a rank's heads only (qk-norm scales, T5's relative-bias table) get partial
gradients on each rank; `sum_partial_grads` sums them over the TP group after the backward, so
every rank of a replica keeps the same copy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from models.blocks import FeedForward, MultiHeadAttention
from trainer.runs.tp_layout import PACKED_ATTR, packed_order


def _reorder_rows_(linear: nn.Linear, perm: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(linear.weight[perm])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[perm])


PARTIAL_ATTR = "_tp_partial"  # on the model: ([(module, parameter name)], TP process group)


def sum_partial_grads(model: nn.Module) -> None:
    """Sum, over the tensor-parallel group, the gradients of the parameters each rank uses on its
    own heads only (qk-norm scales, a per-head relative-bias table); a no-op without TP. Called
    after the last backward of a step, before clipping. Under FSDP x TP the gradient is this rank's
    FSDP shard, the same rows on every rank of the TP group, so the sum is still elementwise."""
    found = getattr(model, PARTIAL_ATTR, None)
    if not found:
        return
    owners, group = found
    for module, name in owners:
        grad = getattr(module, name).grad
        if grad is not None:
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)


def apply_tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard every attention layer and feed-forward of `model` over the 1-D DeviceMesh `mesh`.

    Args:
        model: a `models.transformer.Transformer` on this rank's device (after QAT, AC, compile).
        mesh: the tensor-parallel mesh (n ranks); heads, kv heads and d_ff must divide by n
            (checked by the config validation before the model is built).
    Returns:
        `model`, changed in place; `model._tp_packed` names the reordered packed parameters.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n, r = mesh.size(), mesh.get_local_rank()
    names = {id(m): name for name, m in model.named_modules()}
    packed: dict[str, tuple[list[int], int]] = {}
    partial: list[tuple[nn.Module, str]] = []

    def pack(module: nn.Module, child: str, parts: list[int]) -> None:
        _reorder_rows_(getattr(module, child), packed_order(parts, n))
        prefix = names[id(module)] + "." + child
        packed[prefix + ".weight"] = (parts, n)
        if getattr(module, child).bias is not None:
            packed[prefix + ".bias"] = (parts, n)

    for module in list(model.modules()):
        if isinstance(module, MultiHeadAttention):
            qd, kvd = module.h * module.dh, module.hkv * module.dh
            if module.cross:
                pack(module, "kv", [kvd, kvd])
                plan = {"q": ColwiseParallel(), "kv": ColwiseParallel(), "out": RowwiseParallel()}
            else:
                pack(module, "qkv", [qd, kvd, kvd])
                plan = {"qkv": ColwiseParallel(), "out": RowwiseParallel()}
            parallelize_module(module, mesh, plan)
            module.h, module.hkv = module.h // n, module.hkv // n
            module.head_start = r * module.h
            for norm in (module.q_norm, module.k_norm):
                if norm is not None:
                    partial += [(norm, name) for name, _ in norm.named_parameters(recurse=False)]
        elif isinstance(module, FeedForward):
            if module.activation == "swiglu":
                half = module.up.out_features // 2
                pack(module, "up", [half, half])
            parallelize_module(module, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    for stack in (model.encoder, model.decoder):
        if stack is not None and stack.position.rel_bias(1, 1) is not None:  # a per-head bias table
            partial += [(m, name) for m in stack.position.modules() for name, _ in m.named_parameters(recurse=False)]
    setattr(model, PARTIAL_ATTR, (partial, mesh.get_group()))
    setattr(model, PACKED_ATTR, packed)
    return model
