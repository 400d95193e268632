"""Linear layers whose fp32 CPU GEMMs may run on oneDNN instead of PyTorch's default BLAS.

PyTorch sends an fp32 `F.linear` on x86 CPUs to MKL's sgemm; bf16 (autocast) already goes to
oneDNN. On AMD CPUs MKL's sgemm runs below oneDNN's at this project's shapes (AMD EPYC, AVX512,
2 threads, a (2048 x 384) by (384 x 1536) GEMM and the other block GEMMs of experiment=bench_ref:
forward and input-gradient GEMMs 185-195 GFLOP/s with MKL, 210-215 with oneDNN on an idle
machine; the whole fp32 training step 1.01-1.03x faster idle and 1.12-1.14x with another job on
the cores, the `ours-blas` row of scripts/bench_peers.py). So `linear` computes, for fp32 CPU
tensors with autocast off and eager autograd:

    forward   y  = x W^T (+ b)          oneDNN (`torch.ops.mkldnn._linear_pointwise`)
    backward  dx = dy W                  oneDNN (same op, with W^T, d_in x d_out, as the weight)
              dW = dy^T x, db = sum dy   BLAS (as F.linear's backward; oneDNN needs two transposed
                                         copies of the activations here and lost)

Everything else (other dtypes and devices, autocast, torch.compile, quantized or sharded weight
tensors) is plain `F.linear`. The choice is per machine and fixed, so a run and its resume use
the same kernels: `TRAINER_CPU_FP32_GEMM=onednn|blas` sets it, the default is oneDNN on AMD CPUs
and BLAS elsewhere (Intel CPUs, where MKL is at home, were not measured).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

GEMM_BACKENDS = ("onednn", "blas")
# Set to "onednn" or "blas" to override the machine's choice in this process (benchmark ablations).
FP32_GEMM_OVERRIDE: str | None = None


def _cpu_vendor() -> str:
    """The x86 vendor string from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's linear op and it computes x W^T."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
        return bool(torch.equal(op(x, w, None, "none", [None], ""), x @ w.t()))
    except (RuntimeError, TypeError):
        return False


def requested_backend() -> str | None:
    """TRAINER_CPU_FP32_GEMM as "onednn" or "blas", or None when unset.

    Raises:
        ValueError: it is set to something else (one sentence naming the variable and the values).
    """
    choice = os.environ.get("TRAINER_CPU_FP32_GEMM", "").strip().lower()
    if choice and choice not in GEMM_BACKENDS:
        raise ValueError(f"TRAINER_CPU_FP32_GEMM={choice!r}: valid values are {', '.join(GEMM_BACKENDS)} "
                         f"(unset: oneDNN for fp32 CPU linears on AMD CPUs, BLAS elsewhere).")
    return choice or None


@functools.lru_cache(maxsize=None)
def cpu_fp32_gemm_backend() -> str:
    """"onednn" or "blas": who runs fp32 CPU linears in this process (see the module docstring).

    Raises:
        ValueError: from `requested_backend`.
    """
    choice = requested_backend() or ("onednn" if _cpu_vendor() == "AuthenticAMD" else "blas")
    return "onednn" if choice == "onednn" and _onednn_linear_works() else "blas"


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN's forward and input-gradient GEMMs (fp32, CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.lead = bias is not None, x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [None], "")  # (N, d_out)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # W^T as a transposed view: oneDNN reads it in place (an explicit .contiguous() copy
            # per call, or MKL's mm here, measured 1-2% slower for the whole step).
            dx = torch.ops.mkldnn._linear_pointwise(g2, weight.t(), None, "none", [None], "")
            dx = dx.view(*ctx.lead, weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = g2.t().mm(x2)  # (d_out, d_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., d_in), weight (d_out, d_in), bias (d_out,) or None ->
    (..., d_out). fp32 CPU tensors take oneDNN's GEMMs when `cpu_fp32_gemm_backend()` says so."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and _plain(weight) and _plain(bias)
            and type(x) is torch.Tensor and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and (FP32_GEMM_OVERRIDE or cpu_fp32_gemm_backend()) == "onednn"):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and init) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
