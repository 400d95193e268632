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

from models.ops.tiled_attention import tiled_attention

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


# Where the matmul-softmax path (`_matmul_softmax`) beats SDPA's fused CPU kernel, as the longest
# query x key product per dtype and masking. Measured fwd+bwd, 2 threads, B=8 H=6 Dh=64, AMD EPYC
# with AVX512-BF16 (scripts/bench_attention.py --kernels flash flash-sdpa [--no-causal]), ms:
# causal bf16 T=256 15.5 vs 26.7, T=512 40 vs 84, T=1024 124 vs 182; causal fp32 T=256 27.6 vs
# 31.7, T=512 68 vs 85, T=1024 a tie (229 vs 234: SDPA, which also keeps O(T) instead of O(T^2)
# memory); unmasked bf16 T=128 4.4 vs 11.1, T=512 64 vs 75; unmasked fp32 T=128 a tie, T=256
# 27 vs 23 in an earlier run (SDPA).
MATMUL_SOFTMAX_MAX_SCORES = {(torch.bfloat16, True): 1024 * 1024, (torch.bfloat16, False): 512 * 512,
                             (torch.float32, True): 512 * 512, (torch.float32, False): 128 * 128}
# Query block of the causal matmul-softmax path: block i (queries [i c, (i+1) c)) only multiplies
# the keys it can see, [0, (i+1) c), so a causal product does ~(n+1)/2n of the full one's work.
# 128 was fastest at T=256..1024 (64 pays more per-call overhead, 256 skips less work).
CAUSAL_QUERY_BLOCK = 128


def _causal_bias(tq: int, tk: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> Tensor:
    """(Tq, Tk) additive mask for queries offset..offset+Tq-1: 0 where key j <= query i (top-left
    aligned, as SDPA), -inf above. Built per call (tens of microseconds), not cached: a cache would
    be opaque to torch.compile."""
    return torch.full((tq, tk), float("-inf"), dtype=dtype, device=device).triu(1 + offset)


def _use_matmul_softmax(q: Tensor, k: Tensor, dropout_p: float, causal: bool = True) -> bool:
    """Whether mask-free CPU attention runs as batched GEMMs plus one softmax instead of SDPA's
    fused kernel: for short sequences SDPA's small per-tile GEMMs run far below the GEMM rate
    (bf16 most of all: the CPU's native bf16 dot products need long GEMMs), while a few batched
    GEMMs run near it. Memory is O(Tq * Tk), hence the per-dtype limits in
    MATMUL_SOFTMAX_MAX_SCORES."""
    limit = MATMUL_SOFTMAX_MAX_SCORES.get((q.dtype, causal), 0)
    return (q.device.type == "cpu" and dropout_p == 0.0 and k.dtype == q.dtype
            and q.shape[2] * k.shape[2] <= limit)


def _query_blocks(tq: int, tk: int, causal: bool, block: int) -> list[tuple[int, int, int]]:
    """(query start, query end, keys seen) per query block: causal rows [s, e) see keys [0, min(e, Tk));
    without a causal mask one block covers every query and key."""
    if not causal:
        return [(0, tq, tk)]
    return [(s, min(s + block, tq), min(s + block, tq, tk)) for s in range(0, tq, block)]


class _MatmulSoftmax(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh) + causal mask) v as batched GEMMs, query block by query block.

    Forward per block: scores = baddbmm(mask, q_blk, k_seen^T, alpha=1/sqrt(Dh)) (scale and mask
    fused into the GEMM), p = softmax(scores) (the kernel accumulates in fp32 for bf16 inputs, as
    autocast's fp32 softmax would, and rounds p to the input dtype), out_blk = p v_seen. Backward is
    the standard softmax-attention backward: dv += p^T do, dp = do v^T, ds = p * (dp - rowsum(dp * p)),
    dq = ds k / sqrt(Dh), dk += ds^T q / sqrt(Dh), from the saved p (about Tq * Tk / 2 elements per
    head when causal, Tq * Tk otherwise).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, block: int) -> Tensor:
        b, h, tq, dh = q.shape
        tk = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, tq, dh), k.reshape(b * h, tk, dh), v.reshape(b * h, tk, dh)
        scale = dh ** -0.5
        blocks = _query_blocks(tq, tk, causal, block)
        probs, outs = [], []
        with torch.autocast(q.device.type, enabled=False):
            for s, e, seen in blocks:
                kt = k3[:, :seen].transpose(1, 2)
                if causal:
                    scores = torch.baddbmm(_causal_bias(e - s, seen, q.dtype, q.device, s), q3[:, s:e], kt,
                                           alpha=scale)
                else:
                    scores = torch.bmm(q3, kt).mul_(scale)
                p = torch.softmax(scores, dim=-1)
                probs.append(p)
                outs.append(torch.bmm(p, v3[:, :seen]))
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.blocks, ctx.shape = blocks, (b, h, tq, tk, dh)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.view(b, h, tq, dh)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q3, k3, v3, *probs = ctx.saved_tensors
        b, h, tq, tk, dh = ctx.shape
        scale = dh ** -0.5
        do3 = grad_out.reshape(b * h, tq, dh)
        dk = dv = None
        dqs = []
        # Last block first: it sees the most keys, so its products start dk and dv (no zero fill)
        # when it sees them all; the earlier blocks add into the leading rows.
        for (s, e, seen), p in reversed(list(zip(ctx.blocks, probs))):
            do = do3[:, s:e]
            ds = torch._softmax_backward_data(torch.bmm(do, v3[:, :seen].transpose(1, 2)), p, -1, p.dtype)
            dqs.append(torch.bmm(ds, k3[:, :seen]))
            if dv is None and seen == tk:
                dv, dk = torch.bmm(p.transpose(1, 2), do), torch.bmm(ds.transpose(1, 2), q3[:, s:e])
                continue
            if dv is None:
                dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
            # A product into a temporary, then one add: an in-place baddbmm_ on these row slices
            # (batch stride != rows x cols) falls back to one addmm per batch matrix in fp32.
            dv[:, :seen] += torch.bmm(p.transpose(1, 2), do)
            dk[:, :seen] += torch.bmm(ds.transpose(1, 2), q3[:, s:e])
        dq = (dqs[0] if len(dqs) == 1 else torch.cat(dqs[::-1], dim=1)).mul_(scale)
        dk.mul_(scale)
        return dq.view(b, h, tq, dh), dk.view(b, h, tk, dh), dv.view(b, h, tk, dh), None, None


def _matmul_softmax(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + causal mask) v with batched GEMMs (`_MatmulSoftmax`; causal rows
    in blocks of CAUSAL_QUERY_BLOCK queries that skip the keys they cannot see). Under
    torch.compile the same maths as plain ops, for the compiler to fuse."""
    h, tq, dh = q.shape[1], q.shape[2], q.shape[3]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    if not torch.compiler.is_compiling():
        return _MatmulSoftmax.apply(q, k, v, causal, CAUSAL_QUERY_BLOCK)
    scores = torch.matmul(q * dh ** -0.5, k.transpose(-2, -1))  # (B, H, Tq, Tk)
    if causal:
        scores = scores + _causal_bias(tq, k.shape[2], scores.dtype, scores.device)
    return torch.matmul(scores.softmax(dim=-1), v)  # (B, H, Tq, Dh)


def _flash(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, rel_bias: Tensor | None,
    key_padding_mask: Tensor | None, dropout_p: float,
) -> Tensor:
    """Attention through ``F.scaled_dot_product_attention`` (or, for short sequences on CPU without
    a mask or bias, batched GEMMs and one softmax: ``_use_matmul_softmax``)."""
    if rel_bias is None and key_padding_mask is None:
        if _use_matmul_softmax(q, k, dropout_p, causal):
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
