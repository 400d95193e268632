"""Pooling and embedding: token states -> one unit-norm vector per text.

Mean pooling over real tokens is Sentence-BERT's (Reimers & Gurevych 2019); `cls` takes the first
position (BERT's [CLS]; our rows start with BOS).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.errors import ConfigError
from trainer.precision import autocast

POOLINGS = ("mean", "cls")  # objective.pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Token states (B, T, D) -> one vector per row (B, D), in fp32.

    `mean`: the average over real tokens (`mask` (B, T) True at real tokens; None: all real).
    `cls`: the first position's state. Raises ConfigError for another pooling name.
    """
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ConfigError(f"objective.pooling={pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}.")
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def embed(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """L2-normalised embeddings (B, D) fp32 of `tokens` (B, T) with padding `mask` (B, T)."""
    return F.normalize(pool(model(tokens, mask=mask, head=False), mask, pooling), dim=-1)


@torch.no_grad()
def embed_rows(model: nn.Module, rows: torch.Tensor, pad_id: int, pooling: str, batch_size: int,
               device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Embeddings (N, D) fp32 on the CPU of right-padded token rows (N, L), `batch_size` rows at a
    time (each batch cut to its longest row), under the run's autocast."""
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        mask = part != pad_id
        width = max(int(mask.sum(1).max()), 1)
        with autocast(precision, device):
            out.append(embed(model, part[:, :width].to(device), mask[:, :width].to(device), pooling).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
