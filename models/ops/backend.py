"""Which attention implementation a run's `attention=<kind>` actually executes, by name.

`attention=flash` means "the fused path": on CPU short sequences run as batched GEMMs plus one
softmax (`models.ops.attention._MatmulSoftmax`), otherwise PyTorch's SDPA, whose own dispatcher picks
FlashAttention-2, cuDNN attention, memory-efficient attention or the math fallback per device,
dtype and shape; the choice is asked of that dispatcher for the run's shape (PyTorch SDPA docs).
"""
from __future__ import annotations

import torch

from models.ops.attention import _use_matmul_softmax

_NAMES = {0: "math", 1: "flash-attention-2", 2: "memory-efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """The SDPA backend PyTorch's dispatcher picks for `F.scaled_dot_product_attention(q, k, v,
    is_causal=causal)` with these tensors ((B, H, T, Dh)): `torch._fused_sdp_choice`, the function
    SDPA itself consults, read as `torch.nn.attention.SDPBackend` (on CPU "flash" is the CPU flash
    kernel). "unknown" when this torch lacks it."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    name = _NAMES.get(int(choose(q, k, v, None, 0.0, causal)), "unknown")
    return "flash (CPU kernel)" if name == "flash-attention-2" and q.device.type == "cpu" else name


def attention_backend(kind: str, device: torch.device, dtype: torch.dtype, seq_len: int, num_heads: int,
                      head_dim: int, causal: bool, dropout: float = 0.0) -> str:
    """The implementation `attention=<kind>` runs for one sequence of `seq_len` tokens: "standard
    (matmul + softmax)", "tiled (online softmax, PyTorch)", or for flash the fused CPU GEMM path or
    the SDPA backend (`sdpa_backend`) on a (1, num_heads, seq_len, head_dim) probe."""
    if kind == "standard":
        return "standard (matmul + softmax)"
    if kind == "tiled":
        return "tiled (online softmax, PyTorch)"
    q = torch.zeros(1, num_heads, seq_len, head_dim, device=device, dtype=dtype)
    if _use_matmul_softmax(q, q, dropout, causal):
        return "matmul-softmax (batched GEMMs, CPU)"
    return f"sdpa: {sdpa_backend(q, q, q, causal)}"
