"""Quantized linear layers: int8/int4 weight storage, their matmul kernels, and QAT fake-quant.

Every layer stores its integers as buffers named after the float layer's tensors (`weight`,
plus `scale`/`zero`), so a quantized state_dict keeps the model's module names. Each forward
picks a kernel: one of torch's fused quantized matmuls where it exists, accepts the shapes and
is faster there, else dequantize-then-matmul (always correct, any device, any torch version).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL_POLICIES = ("auto", "fused", "reference")
INT4_FUSED_GROUPS = (32, 64, 128, 256)  # group sizes the CPU int4 kernel accepts
_EPS = 1e-12  # floor for absmax scales: an all-zero row quantizes to zeros, not NaN
_policy = "auto"


@contextlib.contextmanager
def kernel_policy(policy: str) -> Iterator[None]:
    """Within the block, choose kernels by `policy`.

    "auto": fused ops only where they beat dequantize-then-matmul: CUDA `_int_mm`, and the CPU
    int8/int4 weight-only ops for bf16/fp16 activations (they beat the dense half-precision
    GEMM). With fp32 activations the CPU ops, and CPU `_int_mm` at any dtype, measured 10-100x
    slower than sgemm on the dequantized weight for batch-sized inputs (AVX2, torch 2.13).
    "fused": fused ops wherever they accept the inputs (for testing them). "reference": never.
    """
    global _policy
    if policy not in KERNEL_POLICIES:
        raise ValueError(f"kernel policy {policy!r}; choose one of {KERNEL_POLICIES}")
    old, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = old


# ---------------------------------------------------------------- quantize / dequantize

def _round_int8(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer-valued fp32 in [-127, 127], scale): quantize_int8 before the int8 cast."""
    w = w.float()
    scale = w.abs().amax(dim, keepdim=True).clamp_min(_EPS) / 127.0
    return torch.div(w, scale).round_().clamp_(-127, 127), scale


def quantize_int8(w: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 along `dim` (one scale per row of the other dims).

    Returns (q int8 in [-127, 127], scale fp32 with `dim` kept as size 1).
    """
    q, scale = _round_int8(w, dim)
    return q.to(torch.int8), scale


def fake_quant_int8(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """quantize_int8 then dequantize, in x's dtype; gradients pass straight through (STE)."""
    q, scale = _round_int8(x.detach(), dim)
    return x + (q * scale - x.detach().float()).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: even columns in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max) int4 per group of `group_size` inputs: w ~ (q - 8) * scale + zero.

    The "- 8" offset matches the layout of torch's int4 matmul kernels, so their inputs need no
    conversion. Scales and zeros are stored in fp16 (1 bit/weight at group 32; fp32 would be 2).
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
    # (q - 8) * s + z as one fused pass: q * s + (z - 8 s).
    return torch.addcmul(zero.to(dtype)[..., None] - 8 * scale, q, scale).reshape(n, -1)


# ---------------------------------------------------------------- kernel selection

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: autocast's when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.lru_cache(maxsize=None)
def fused_op_works(op: str, device: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch's fused `op` exists on `device` and matches the reference on a small problem.

    Probed once per (op, device, dtype): an op missing in this torch build, unimplemented for
    the device, or silently wrong in this version turns into the dequantize fallback.
    """
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            if op == "int_mm":
                a = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8)
                b = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
                out = torch._int_mm(a.to(device), b.to(device).t()).cpu()
                return bool(torch.equal(out, a.int() @ b.int().t()))
            w = torch.randn(48, 64, generator=gen)
            x = torch.randn(4, 64, generator=gen)
            if op == "int8pack":
                q, s = quantize_int8(w)
                out = torch._weight_int8pack_mm(x.to(device, dtype), q.to(device), s.flatten().to(device, dtype))
                ref = x @ (q.float() * s).t()
            elif op == "int4pack":
                packed, s, z = quantize_int4(w, 32)
                layer = Int4WeightLinear(packed.to(device), s.to(device), z.to(device), None, 32)
                out = layer._fused_int4(x.to(device, dtype))
                ref = x @ dequantize_int4(packed, s, z).t()
            else:
                raise ValueError(op)
            err = (out.float().cpu() - ref).abs().max() / ref.abs().max()
            return bool(err < (1e-4 if dtype == torch.float32 else 3e-2))
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False


def _use_fused(op: str, x: torch.Tensor, dtype: torch.dtype, shape_ok: bool, fast: bool) -> bool:
    if _policy == "reference" or not shape_ok or (_policy == "auto" and not fast):
        return False
    return fused_op_works(op, str(x.device), dtype)


# ---------------------------------------------------------------- layers

class QuantLinear(nn.Module):
    """Shared plumbing: shapes, optional fp32 bias, (..., K) -> (M, K) flattening."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = ""  # the kernel the last forward ran (for reports)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _finish(self, y: torch.Tensor, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightLinear(QuantLinear):
    """Weight-only int8: per-output-channel symmetric scales; activations stay in float."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scale", scale.reshape(-1).float())  # (N,)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8WeightLinear":
        """Quantize a float nn.Linear."""
        q, scale = quantize_int8(linear.weight.detach())
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if _use_fused("int8pack", x, dtype, shape_ok=x.device.type == "cpu",
                      fast=dtype in (torch.bfloat16, torch.float16)):
            self.kernel = "_weight_int8pack_mm"
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(dtype))
        else:
            self.kernel = "dequantize+matmul"
            y = F.linear(x2, self.weight.to(dtype) * self.scale.to(dtype)[:, None])
        return self._finish(y, lead, dtype)


class DynamicInt8Linear(Int8WeightLinear):
    """int8 weights (per output channel) x int8 activations (per token, absmax, at run time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], _compute_dtype(x)
        xr, xs = _round_int8(x.reshape(-1, self.in_features), -1)  # (M, K) integer-valued, (M, 1)
        m, k, n = xr.shape[0], self.in_features, self.out_features
        cuda_shape = m > 16 and k % 8 == 0 and n % 8 == 0  # cuBLAS int8 GEMM constraints
        if _use_fused("int_mm", x, torch.int8, shape_ok=x.device.type != "cuda" or cuda_shape,
                      fast=x.device.type == "cuda"):
            self.kernel = "_int_mm"
            acc = torch._int_mm(xr.to(torch.int8), self.weight.t()).float()
        else:
            self.kernel = "int8 values as fp32 matmul"
            # Integer products summed in fp32: exact up to 2^24, the same numbers _int_mm gives.
            with torch.autocast(x.device.type, enabled=False):
                acc = xr @ self.weight.float().t()
        return self._finish(acc.mul_(xs).mul_(self.scale), lead, dtype)


class Int4WeightLinear(QuantLinear):
    """Weight-only int4, group-wise asymmetric, two values per byte; activations in float."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        super().__init__(weight.shape[1] * 2, weight.shape[0], bias)
        self.group_size = group_size
        self.register_buffer("weight", weight)  # (N, K/2) uint8
        self.register_buffer("scale", scale)  # (N, K/g) fp16
        self.register_buffer("zero", zero)  # (N, K/g) fp16
        self._kernel_cache: tuple | None = None  # (key, kernel-layout weight, scales+zeros)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> "Int4WeightLinear":
        """Quantize a float nn.Linear (group_size must divide in_features)."""
        packed, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        return cls(packed, scale, zero, linear.bias, group_size)

    def _fused_int4(self, x2: torch.Tensor) -> torch.Tensor:
        # The CPU kernel wants its own blocked layout; built once per device/dtype and kept out
        # of the state_dict, so the stored format stays the portable nibble packing.
        # Keyed on the buffers' version counters too: load_state_dict overwrites them in place.
        key = (self.weight.device, x2.dtype, self.weight.data_ptr(), self.weight._version,
               self.scale._version, self.zero._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
            with torch.autocast(x2.device.type, enabled=False):  # stack is an autocast op
                sz = torch.stack([self.scale.t(), self.zero.t()], dim=-1).to(x2.dtype).contiguous()
            self._kernel_cache = (key, w, sz)
        _, w, sz = self._kernel_cache
        return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), w, self.group_size, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        shape_ok = (x.device.type == "cpu" and self.group_size in INT4_FUSED_GROUPS
                    and self.out_features % 16 == 0)
        if _use_fused("int4pack", x, dtype, shape_ok, fast=dtype in (torch.bfloat16, torch.float16)):
            self.kernel = "_weight_int4pack_mm_for_cpu"
            y = self._fused_int4(x2)
        else:
            self.kernel = "unpack+dequantize+matmul"
            y = F.linear(x2, dequantize_int4(self.weight, self.scale, self.zero, dtype))
        return self._finish(y, lead, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class FakeQuantLinear(nn.Linear):
    """QAT: an nn.Linear whose forward sees int8-rounded weights (per output channel) and
    int8-rounded activations (per token), as DynamicInt8Linear computes them after training.

    Straight-through estimator: rounding is treated as identity in the backward pass. The
    parameters are the nn.Linear's own (`weight`, `bias`), so state_dicts and checkpoints are
    interchangeable with the unquantized model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_int8(x, -1), fake_quant_int8(self.weight, -1), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "FakeQuantLinear":
        """Wrap `linear`, sharing its parameter objects (no copy)."""
        fq = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fq.weight = linear.weight
        if linear.bias is not None:
            fq.bias = linear.bias
        return fq
