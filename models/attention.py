"""Scaled dot-product attention with interchangeable kernels.

``attention`` is the single entry point used by the model's attention layers.
All kernels share one contract:

* q is (B, H, Tq, Dh); k and v are (B, Hkv, Tk, Dh) with H % Hkv == 0, query
  head h reading kv head h // (H // Hkv) (grouped-query / multi-query).
* Scores are scaled by 1/sqrt(Dh); ``causal`` lets query i see keys j <= i.
* ``rel_bias`` is an (H, Tq + Tk - 1) additive bias that depends only on the
  offset j - i (T5 relative buckets, ALiBi): bias[h, i, j] =
  rel_bias[h, j - i + Tq - 1]. Gradients flow to it in every kernel.
* ``key_padding_mask`` is (B, Tk) bool with True for real tokens.
* A query row with no visible key returns zeros, with zero gradients.

Kernels:
    standard: explicit softmax(q k^T) v; materialises (B, H, Tq, Tk).
    flash: ``torch.nn.functional.scaled_dot_product_attention``.
    tiled: pure-PyTorch blockwise attention with an online softmax and O(T)
        saved state (see ``models.tiled_attention``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from models.tiled_attention import tiled_attention

KERNELS = ("standard", "flash", "tiled")


def expand_rel_bias(rel_bias: Tensor, tq: int, tk: int) -> Tensor:
    """Expand an offset bias (H, tq + tk - 1) to its Toeplitz form (H, tq, tk).

    Uses ``gather`` so the result stays differentiable w.r.t. ``rel_bias``.
    """
    h = rel_bias.shape[0]
    rows = torch.arange(tq, device=rel_bias.device)
    cols = torch.arange(tk, device=rel_bias.device)
    idx = cols[None, :] - rows[:, None] + (tq - 1)  # (tq, tk), j - i shifted to >= 0
    return rel_bias.gather(1, idx.reshape(1, -1).expand(h, -1)).view(h, tq, tk)


def _repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """Give each query head its kv head: (B, Hkv, T, Dh) -> (B, H, T, Dh)."""
    b, hkv, t, dh = x.shape
    if hkv == num_heads:
        return x
    x = x[:, :, None].expand(b, hkv, num_heads // hkv, t, dh)  # (B, Hkv, G, T, Dh)
    return x.reshape(b, num_heads, t, dh)  # same order as repeat_interleave(dim=1)


def _visibility(
    causal: bool, key_padding_mask: Tensor | None, tq: int, tk: int, device: torch.device,
) -> Tensor | None:
    """Bool (B or 1, 1, Tq, Tk) mask of visible keys, or None if all are visible."""
    visible = None
    if causal:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        keep = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        visible = keep if visible is None else visible & keep
    return visible


def _standard(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, rel_bias: Tensor | None,
    key_padding_mask: Tensor | None, dropout_p: float,
) -> Tensor:
    """Reference attention that materialises the full probability matrix."""
    h, tq, dh = q.shape[1], q.shape[2], q.shape[3]
    tk = k.shape[2]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    # Softmax in fp32: bf16/fp16 logits lose too much precision in exp/sum.
    sdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q, k.transpose(-2, -1)).to(sdt) * dh ** -0.5  # (B, H, Tq, Tk)
    if rel_bias is not None:
        scores = scores + expand_rel_bias(rel_bias, tq, tk).to(sdt)
    visible = _visibility(causal, key_padding_mask, tq, tk, q.device)
    empty = None
    if visible is not None:
        # Unmask rows with no visible key so softmax stays finite, then zero them.
        empty = ~visible.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~(visible | empty), float("-inf"))
    probs = scores.softmax(dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


@functools.lru_cache(maxsize=None)
def _sdpa_has_gqa() -> bool:
    """Whether the installed SDPA accepts ``enable_gqa`` (torch >= 2.5)."""
    x = torch.zeros(1, 2, 1, 8)
    try:
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def _sdpa_kv(q: Tensor, k: Tensor, v: Tensor, masked: bool) -> tuple[Tensor, Tensor, dict]:
    """Pick native GQA or expanded k/v so SDPA keeps a fused backend.

    On CUDA only the FlashAttention backend (fp16/bf16, no mask) handles
    ``enable_gqa``; elsewhere it would fall back to the O(T^2) math backend,
    while expanding k/v costs only O(T) and keeps the efficient kernel.
    """
    h = q.shape[1]
    if k.shape[1] == h:
        return k, v, {}
    if _sdpa_has_gqa() and (
        q.device.type == "cpu" or (not masked and q.dtype in (torch.float16, torch.bfloat16))
    ):
        return k, v, {"enable_gqa": True}
    return _repeat_kv(k, h), _repeat_kv(v, h), {}


# Longest query x key product for which the matmul-softmax path beats SDPA's CPU flash kernel
# in bf16 (2 threads, causal fwd+bwd, B=8 H=6 Dh=64, AVX512-BF16 EPYC: T=128 4.7 vs 12.7 ms,
# T=256 13-18 vs 25-27, T=512 49-55 vs 79-86, T=1024 275-286 vs 188-197); beyond it SDPA wins
# and the saved (Tq, Tk) probabilities would cost O(T^2) memory.
MATMUL_SOFTMAX_MAX_SCORES = 512 * 512


def _causal_bias(tq: int, tk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(Tq, Tk) additive mask: 0 where key j <= query i (top-left aligned, as SDPA), -inf above.
    Built per call (tens of microseconds), not cached: a cache would be opaque to torch.compile."""
    return torch.full((tq, tk), float("-inf"), dtype=dtype, device=device).triu(1)


def _use_matmul_softmax(q: Tensor, k: Tensor, dropout_p: float) -> bool:
    """bf16 on CPU: SDPA's flash kernel runs its small per-tile GEMMs far below the native bf16
    GEMM rate, while two batched GEMMs plus one softmax run near it (the CPU has native bf16
    dot products: AVX512-BF16 or AMX). Short sequences only (memory is O(Tq * Tk))."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0
            and q.shape[2] * k.shape[2] <= MATMUL_SOFTMAX_MAX_SCORES)


def _matmul_softmax(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + causal mask) v with bf16 GEMMs; the softmax's exp and sum are
    computed in fp32 inside the kernel (as autocast's fp32 softmax would), rounded to bf16."""
    h, tq, dh = q.shape[1], q.shape[2], q.shape[3]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    # Scaling q (B, H, Tq, Dh) costs Dh/Tk of scaling the scores.
    scores = torch.matmul(q * dh ** -0.5, k.transpose(-2, -1))  # (B, H, Tq, Tk)
    if causal:
        scores = scores + _causal_bias(tq, k.shape[2], scores.dtype, scores.device)
    return torch.matmul(scores.softmax(dim=-1), v)  # (B, H, Tq, Dh)


def _flash(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, rel_bias: Tensor | None,
    key_padding_mask: Tensor | None, dropout_p: float,
) -> Tensor:
    """Attention through ``F.scaled_dot_product_attention`` (or, for short bf16 sequences on CPU
    without a mask or bias, two batched GEMMs and a softmax: ``_use_matmul_softmax``)."""
    if rel_bias is None and key_padding_mask is None:
        if _use_matmul_softmax(q, k, dropout_p):
            return _matmul_softmax(q, k, v, causal)
        # Mask-free call: is_causal selects the fused flash / efficient kernels.
        k, v, extra = _sdpa_kv(q, k, v, masked=False)
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, **extra)
    tq, tk = q.shape[2], k.shape[2]
    visible = _visibility(causal, key_padding_mask, tq, tk, q.device)
    empty = None
    if visible is not None:
        # A fully masked row would make the kernel emit NaN; unmask it, zero it after.
        empty = ~visible.any(dim=-1, keepdim=True)  # (B or 1, 1, Tq, 1)
        visible = visible | empty
    mask: Tensor | None = visible
    if rel_bias is not None:
        mask = expand_rel_bias(rel_bias, tq, tk).to(q.dtype)[None]  # (1, H, Tq, Tk)
        if visible is not None:
            mask = mask.masked_fill(~visible, float("-inf"))
    k, v, extra = _sdpa_kv(q, k, v, masked=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **extra)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _validate(
    q: Tensor, k: Tensor, v: Tensor, kernel: str, rel_bias: Tensor | None,
    key_padding_mask: Tensor | None, dropout_p: float, block_size: int,
) -> None:
    """Raise ValueError for inconsistent shapes or options."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; "
                         f"valid kernels: {', '.join(KERNELS)}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, Tq, Dh) and k, v (B, Hkv, Tk, Dh); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, tq, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} incompatible with q shape {tuple(q.shape)}")
    tk = k.shape[2]
    if rel_bias is not None and tuple(rel_bias.shape) != (h, tq + tk - 1):
        raise ValueError(f"rel_bias must be (H, Tq + Tk - 1) = {(h, tq + tk - 1)}, "
                         f"got {tuple(rel_bias.shape)}")
    if key_padding_mask is not None and (
        tuple(key_padding_mask.shape) != (b, tk) or key_padding_mask.dtype != torch.bool
    ):
        raise ValueError(f"key_padding_mask must be bool (B, Tk) = {(b, tk)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if kernel == "tiled" and dropout_p > 0.0:
        raise ValueError(f"attention=tiled does not support attention dropout (dropout_p="
                         f"{dropout_p}); use attention=standard or attention=flash")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, kernel: str, causal: bool = False,
    rel_bias: Tensor | None = None, key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0, block_size: int = 128,
) -> Tensor:
    """Multi-head attention with a selectable kernel.

    Args:
        q: Queries, (B, H, Tq, Dh).
        k: Keys, (B, Hkv, Tk, Dh); H must be a multiple of Hkv.
        v: Values, (B, Hkv, Tk, Dh).
        kernel: One of ``KERNELS``.
        causal: Query i sees keys j <= i (top-left aligned).
        rel_bias: Optional offset bias (H, Tq + Tk - 1), see module docstring.
        key_padding_mask: Optional (B, Tk) bool, True = real token.
        dropout_p: Dropout on attention probabilities (not supported by tiled).
        block_size: Tile length for the tiled kernel; 128 and 256 were fastest
            in scripts/bench_attention.py on CPU (64 pays more per-tile overhead).

    Returns:
        (B, H, Tq, Dh) in q's dtype.

    Raises:
        ValueError: On an unknown kernel, bad shapes, or dropout with tiled.
    """
    _validate(q, k, v, kernel, rel_bias, key_padding_mask, dropout_p, block_size)
    if kernel == "tiled":
        return tiled_attention(q, k, v, causal=causal, rel_bias=rel_bias,
                               key_padding_mask=key_padding_mask, block_size=block_size)
    fn = _standard if kernel == "standard" else _flash
    return fn(q, k, v, causal, rel_bias, key_padding_mask, dropout_p)
