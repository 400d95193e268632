"""The int4 weight-only layer for devices where torchao has no int4 kernel.

torchao 0.18's `Int4WeightOnlyConfig` runs on CUDA only (plain/preshuffled need `mslk`,
tile_packed_to_4d bf16 tinygemm, plain_int32 XPU/NPU); its portable `IntxWeightOnlyConfig(int4)`
stores a byte per value. This layer packs two per byte (~6x smaller block linears on a CPU too)
and runs dequantize + matmul, or `_weight_int4pack_mm_for_cpu` for bf16/fp16 activations.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INT4_FUSED_GROUPS = (32, 64, 128, 256)  # group sizes the CPU int4 kernel accepts


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: even columns in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max) int4 per group of `group_size` inputs: w ~ (q - 8) * scale + zero.

    The "- 8" offset matches torch's int4 matmul kernels. Scales and zeros are fp16.
    Returns (packed uint8 (N, K/2), scale fp16 (N, K/g), zero fp16 (N, K/g)).
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float16).tiny).half()
    zero = (lo + 8 * scale.float()).half()  # the value q = 8 maps to
    # Round with the fp16 scale/zero actually stored, so dequantization sees the same grid.
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return pack_int4(q.reshape(n, k)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K/2) packed int4 + per-group scale/zero -> (N, K) weight in `dtype`."""
    n, groups = scale.shape
    q = unpack_int4(packed).reshape(n, groups, -1).to(dtype)
    scale = scale.to(dtype)[..., None]
    return torch.addcmul(zero.to(dtype)[..., None] - 8 * scale, q, scale).reshape(n, -1)


class Int4WeightLinear(nn.Module):
    """Weight-only int4, group-wise asymmetric, two values per byte; activations in float."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.shape[1] * 2, weight.shape[0], group_size
        self.register_buffer("weight", weight)  # (N, K/2) uint8
        self.register_buffer("scale", scale)  # (N, K/g) fp16
        self.register_buffer("zero", zero)  # (N, K/g) fp16
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> "Int4WeightLinear":
        """Quantize a float nn.Linear (group_size must divide in_features)."""
        return cls(*quantize_int4(linear.weight.detach(), group_size), linear.bias, group_size)

    def fused(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether torch's CPU int4 kernel takes these inputs (bf16/fp16 on CPU, its group sizes)."""
        return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and self.out_features % 16 == 0
                and self.group_size in INT4_FUSED_GROUPS)

    def _kernel_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel-packed weight, scale-and-zero in `dtype`), converted once and kept until the
        buffers or the dtype change (not state: `weight`, `scale`, `zero` stay the saved form)."""
        key = (dtype, *((t.data_ptr(), t._version) for t in (self.weight, self.scale, self.zero)))
        cached = getattr(self, "_operands", None)
        if cached is None or cached[0] != key:
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
            with torch.autocast("cpu", enabled=False):  # stack is an autocast op
                sz = torch.stack([self.scale.t(), self.zero.t()], dim=-1).to(dtype).contiguous()
            cached = self._operands = (key, w, sz)
        return cached[1], cached[2]

    def _fused(self, x2: torch.Tensor) -> torch.Tensor:
        w, sz = self._kernel_operands(x2.dtype)
        return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), w, self.group_size, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if self.fused(x.device, dtype):
            y = self._fused(x2)
        else:
            y = F.linear(x2, dequantize_int4(self.weight, self.scale, self.zero, dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
