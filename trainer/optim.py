"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw",)  # optim=<name>
SCHEDULES = ("cosine", "constant")  # schedule=<name>


def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed) by what each parameter is.

    The rule (GPT-2 / nanoGPT, BERT): weight decay applies to matmul weights, i.e. the `weight`
    of every `nn.Linear` (QAT's fake-quant linears and an untied LM head included), and to the
    token embedding (tied to the head). Everything else is not decayed: norm scales and shifts,
    biases, and position parameters (learned position tables, T5's relative-bias table), which
    are lookup tables of offsets, not matmuls. Decided by module type, never by tensor rank.
    Each parameter appears once (tied weights are shared, wrappers like DDP/FSDP/compile are seen
    through).
    """
    from models.transformer import Transformer

    decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            decay_ids.add(id(module.weight))
        elif isinstance(module, Transformer):
            decay_ids.add(id(module.embed.weight))
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matmul weights and the token embedding only (`decay_parameters`).

    The fused kernel (one pass over all parameters, no per-tensor Python loop) is used where
    this torch has it for the device; otherwise the multi-tensor `foreach` path.
    """
    decay, no_decay = decay_parameters(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported here (device, dtype or DTensor)
        return torch.optim.AdamW(groups, foreach=True, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` (or constant after warmup)."""
    warmup = cfg.warmup_steps
    floor = getattr(cfg, "min_lr_ratio", 0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
