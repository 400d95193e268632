"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases or the relative-bias table's rows).

    The fused kernel (one pass over all parameters, no per-tensor Python loop) is used where
    this torch has it for the device; otherwise the multi-tensor `foreach` path.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
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
