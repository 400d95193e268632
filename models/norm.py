"""Normalisation layers with one calling convention.

Every module here is called as ``norm(x, mask)`` with ``x`` of shape ``(B, T, D)``
and ``mask`` of shape ``(B, T)`` (bool, True = real token) or None. Per-token norms
ignore the mask; batch norm uses it so padding never enters its statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("layernorm", "rmsnorm", "batchnorm")


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim, with the shared ``(x, mask)`` signature."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalise each token; ``mask`` is unused since statistics are per token."""
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 and cast back to ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalise each token; ``mask`` is unused since statistics are per token."""
        xf = x.float()
        w = self.weight.float()
        if hasattr(F, "rms_norm"):
            out = F.rms_norm(xf, (self.dim,), w, self.eps)
        else:
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class MaskedBatchNorm(nn.Module):
    """Batch norm over the feature dim whose batch statistics use only real (unmasked) tokens.

    Matches ``nn.BatchNorm1d`` applied to the real tokens alone: biased variance to
    normalise, unbiased variance for the running estimate, ``momentum`` = 0.1.
    Statistics are per process (no cross-device sync). Padded outputs are zeroed, and padded
    inputs (even inf/nan) get zero gradient and leave every other gradient unchanged.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        # Kept so checkpoints share nn.BatchNorm1d's state_dict keys.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _batch_stats(self, xf: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, biased variance (both ``(D,)``) and real-token count over real tokens of ``xf`` (fp32)."""
        if mask is None:
            flat = xf.reshape(-1, self.dim)  # (B*T, D)
            n = torch.tensor(flat.shape[0], dtype=xf.dtype, device=xf.device)
            mean = flat.mean(0)
            return mean, (flat - mean).pow(2).mean(0), n
        keep = mask.unsqueeze(-1)  # (B, T, 1)
        n = mask.sum().to(xf.dtype)
        denom = n.clamp(min=1.0)
        # masked_fill, not multiplication: padding may hold inf/nan and 0 * inf = nan.
        mean = xf.masked_fill(~keep, 0.0).sum((0, 1)) / denom
        var = (xf - mean).masked_fill(~keep, 0.0).pow(2).sum((0, 1)) / denom
        return mean, var, n

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """EMA of mean and unbiased variance; skipped (without a host sync) when under 2 real tokens."""
        ok = n > 1
        unbiased = var * n / (n - 1).clamp(min=1.0)
        m = self.momentum
        new_mean = (1 - m) * self.running_mean.float() + m * mean
        new_var = (1 - m) * self.running_var.float() + m * unbiased
        self.running_mean.copy_(torch.where(ok, new_mean, self.running_mean.float()))
        self.running_var.copy_(torch.where(ok, new_var, self.running_var.float()))
        self.num_batches_tracked.add_(1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalise ``x`` ``(B, T, D)``; batch stats in training, running stats in eval."""
        # fp32 statistics: bf16 sums over many tokens lose too much precision.
        xf = x.float()
        mask = None if mask is None else mask.bool()
        if mask is not None:
            # Zero padding before any arithmetic: masking only the output keeps the forward finite,
            # but backward would still form 0 * inf = nan in the weight/bias/input gradients.
            # masked_fill passes no gradient to padded inputs, so padding never reaches a gradient.
            xf = xf.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, T, D)
        if self.training:
            mean, var, n = self._batch_stats(xf, mask)
            self._update_running(mean.detach(), var.detach(), n)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        out = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        if mask is not None:
            # Keep padded outputs finite whatever garbage sat there.
            out = out.masked_fill(~mask.unsqueeze(-1), 0.0)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, momentum={self.momentum}"


def build_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """Build the norm named ``kind`` (one of ``NORMS``) over feature size ``dim``.

    Raises:
        ValueError: Unknown ``kind``.
    """
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "batchnorm":
        return MaskedBatchNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
