"""Blockwise attention with an online softmax and O(T) saved state.

The forward pass walks query blocks and, for each, the key blocks it can see,
keeping a running row max ``m`` and running denominator ``l`` so that the full
(Tq, Tk) score matrix never exists. Only q, k, v, the output and the per-row
logsumexp are saved; the backward pass recomputes each tile's probabilities
from the logsumexp (FlashAttention-2 style, with ``D = rowsum(dO * O)``).

Internally query heads are grouped by the kv head they share: queries live in
a ``(N, T, G, Dh)`` layout with ``N = B * Hkv`` and ``G = H // Hkv``, so one
``bmm`` against an un-expanded kv block serves all ``G`` query heads and dK/dV
come out already summed over the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Number of (query block, key block) score tiles computed per pass. Tests use
# it to check that causal attention skips tiles above the diagonal.
BLOCK_COUNTS: dict[str, int] = {"forward": 0, "backward": 0}


def reset_block_counts() -> None:
    """Zero the tile counters in ``BLOCK_COUNTS``."""
    for name in BLOCK_COUNTS:
        BLOCK_COUNTS[name] = 0


@dataclass
class _Tiling:
    """Shapes, masks and bias shared by the forward and backward tile loops."""

    b: int
    hkv: int
    g: int
    tq: int
    tk: int
    block: int
    causal: bool
    pad: Tensor | None  # (B, Tk) bool, True = padding (inverse of the key mask)
    pad_blocks: list[bool]  # whether key block j contains any padding
    rel: Tensor | None  # (H, Tq + Tk - 1) in the compute dtype
    offsets: Tensor  # (block, block) long: j - i within a tile
    guard_empty: bool  # a row may have no visible key so far

    def key_end(self, i1: int) -> int:
        """Exclusive end of the keys visible to query rows ``< i1``."""
        return min(self.tk, i1) if self.causal else self.tk

    def query_start(self, j0: int) -> int:
        """Start of the first query block that can see key ``j0``."""
        return (j0 // self.block) * self.block if self.causal else 0

    def bias_index(self, i0: int, j0: int, bq: int, bk: int) -> Tensor:
        """Offsets into ``rel`` for a tile, shape (bq, bk)."""
        return self.offsets[:bq, :bk] + (j0 - i0 + self.tq - 1)


def _make_tiling(
    q: Tensor, k: Tensor, causal: bool, rel_bias: Tensor | None,
    key_padding_mask: Tensor | None, block: int, dtype: torch.dtype,
) -> _Tiling:
    """Precompute per-call constants for the tile loops."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    pad, pad_blocks = None, [False] * math.ceil(tk / block)
    if key_padding_mask is not None:
        pad = ~key_padding_mask.to(device=q.device, dtype=torch.bool)
        # One host sync per call (not per tile) to know which key blocks need a mask.
        padded = torch.nn.functional.pad(pad, (0, len(pad_blocks) * block - tk))
        pad_blocks = padded.view(b, -1, block).any(dim=2).any(dim=0).tolist()
    ar = torch.arange(block, device=q.device)
    return _Tiling(
        b=b, hkv=hkv, g=h // hkv, tq=tq, tk=tk, block=block, causal=causal,
        pad=pad, pad_blocks=pad_blocks,
        rel=None if rel_bias is None else rel_bias.to(dtype),
        offsets=ar[None, :] - ar[:, None],
        guard_empty=pad is not None or rel_bias is not None,
    )


def _tile_scores(sp: _Tiling, q_blk: Tensor, k_blk: Tensor, i0: int, j0: int) -> Tensor:
    """Scores of one tile with bias and masks applied, shape (N, bq * G, bk).

    ``q_blk`` is (N, bq, G, Dh) and already multiplied by the softmax scale.
    """
    bq, bk = q_blk.shape[1], k_blk.shape[1]
    s = torch.bmm(q_blk.reshape(-1, bq * sp.g, q_blk.shape[-1]), k_blk.transpose(1, 2))
    s5 = s.view(sp.b, sp.hkv, bq, sp.g, bk)  # (B, Hkv, bq, G, bk)
    if sp.rel is not None:
        bias = sp.rel[:, sp.bias_index(i0, j0, bq, bk)]  # (H, bq, bk)
        s5.add_(bias.view(sp.hkv, sp.g, bq, bk).transpose(1, 2))
    mask = None
    if sp.causal and j0 + bk - 1 > i0:  # only tiles crossing the diagonal
        rows = torch.arange(i0, i0 + bq, device=s.device)
        cols = torch.arange(j0, j0 + bk, device=s.device)
        mask = (cols[None, :] > rows[:, None])[:, None, :]  # (bq, 1, bk)
    if sp.pad is not None and sp.pad_blocks[j0 // sp.block]:
        pad = sp.pad[:, None, None, None, j0:j0 + bk]  # (B, 1, 1, 1, bk)
        mask = pad if mask is None else mask | pad
    if mask is not None:
        s5.masked_fill_(mask, float("-inf"))
    return s


def _forward_query_block(
    sp: _Tiling, q_blk: Tensor, k: Tensor, v: Tensor, i0: int,
) -> tuple[Tensor, Tensor]:
    """Online-softmax attention of one query block; returns (out, lse)."""
    n, bq, g, dh = q_blk.shape
    rows = bq * g
    m = q_blk.new_full((n, rows, 1), float("-inf"))  # running row max
    l = q_blk.new_zeros((n, rows, 1))  # running softmax denominator
    acc = q_blk.new_zeros((n, rows, dh))  # unnormalised output
    for j0 in range(0, sp.key_end(i0 + bq), sp.block):
        BLOCK_COUNTS["forward"] += 1
        k_blk, v_blk = k[:, j0:j0 + sp.block], v[:, j0:j0 + sp.block]
        s = _tile_scores(sp, q_blk, k_blk, i0, j0)  # (N, rows, bk)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        shift = m_new
        if sp.guard_empty:
            # A row with nothing visible yet has m = -inf; shift it by 0 instead
            # so exp() gives 0 rather than NaN from (-inf) - (-inf). m itself
            # keeps -inf so later tiles still rescale against their true max.
            shift = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = s.sub_(shift).exp_()
        alpha = (m - shift).exp_()  # rescales what was accumulated so far
        l = l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
        acc = acc.mul_(alpha).baddbmm_(p, v_blk)
        m = m_new
    empty = l == 0
    out = acc / l.masked_fill(empty, 1.0)  # empty rows: acc is 0, so out is 0
    # +inf makes exp(S - lse) vanish for empty rows in the backward pass.
    lse = torch.where(empty, float("inf"), m + l.log())
    return out.view(n, bq, g, dh), lse.view(n, bq, g)


def _backward_key_block(
    sp: _Tiling, qs: Tensor, k_blk: Tensor, v_blk: Tensor, do: Tensor,
    lse: Tensor, delta: Tensor, grads: tuple[Tensor, Tensor, Tensor, Tensor | None], j0: int,
) -> None:
    """Accumulate one key block's contribution into ``grads = (dq, dk_blk, dv_blk, drel)``."""
    n, bk, dh = k_blk.shape
    dq, dk, dv, drel = grads
    for i0 in range(sp.query_start(j0), sp.tq, sp.block):
        BLOCK_COUNTS["backward"] += 1
        i1 = min(i0 + sp.block, sp.tq)
        rows = (i1 - i0) * sp.g
        q_blk = qs[:, i0:i1]  # (N, bq, G, Dh)
        s = _tile_scores(sp, q_blk, k_blk, i0, j0)  # (N, rows, bk)
        p = s.sub_(lse[:, i0:i1].reshape(n, rows, 1)).exp_()
        do_blk = do[:, i0:i1].reshape(n, rows, dh)
        dv.baddbmm_(p.transpose(1, 2), do_blk)
        dp = torch.bmm(do_blk, v_blk.transpose(1, 2))
        ds = dp.sub_(delta[:, i0:i1].reshape(n, rows, 1)).mul_(p)  # dL/dS
        dq[:, i0:i1].view(n, rows, dh).baddbmm_(ds, k_blk)
        dk.baddbmm_(ds.transpose(1, 2), q_blk.reshape(n, rows, dh))
        if drel is not None:
            bq = i1 - i0
            ds_h = ds.view(sp.b, sp.hkv, bq, sp.g, bk).sum(dim=0).transpose(1, 2)
            idx = sp.bias_index(i0, j0, bq, bk).reshape(-1)
            drel.index_add_(1, idx, ds_h.reshape(-1, bq * bk))  # (H, bq * bk)


def _to_grouped(x: Tensor, hkv: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """(B, H, T, Dh) -> contiguous (B * Hkv, T, G, Dh) in ``dtype``."""
    b, h, t, dh = x.shape
    x = x.view(b, hkv, h // hkv, t, dh).transpose(2, 3)  # (B, Hkv, T, G, Dh)
    x = x.to(dtype) * scale if scale != 1.0 else x.to(dtype)
    # contiguous() so each query tile is a plain view of (bq * G) rows.
    return x.reshape(b * hkv, t, h // hkv, dh).contiguous()


def _from_grouped(x: Tensor, b: int, dtype: torch.dtype) -> Tensor:
    """(B * Hkv, T, G, Dh) -> (B, H, T, Dh) in ``dtype``."""
    n, t, g, dh = x.shape
    x = x.view(b, n // b, t, g, dh).transpose(2, 3)  # (B, Hkv, G, T, Dh)
    return x.reshape(b, (n // b) * g, t, dh).to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half-precision inputs in fp32; keep fp32/fp64 as is."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class TiledAttention(torch.autograd.Function):
    """Memory-efficient attention whose backward recomputes tiles from the logsumexp."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor | None,
        key_padding_mask: Tensor | None, causal: bool, block_size: int,
    ) -> Tensor:
        """Run the tile loop; see ``tiled_attention`` for the argument contract."""
        b, h, tq, dh = q.shape
        hkv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        sp = _make_tiling(q, k, causal, rel_bias, key_padding_mask, block_size, cdt)
        qs = _to_grouped(q, hkv, cdt, scale=dh ** -0.5)  # (N, Tq, G, Dh)
        kc = k.to(cdt).reshape(b * hkv, -1, dh).contiguous()  # (N, Tk, Dh)
        vc = v.to(cdt).reshape(b * hkv, -1, dh).contiguous()
        out = torch.empty_like(qs)
        lse = qs.new_empty(qs.shape[:-1])  # (N, Tq, G)
        for i0 in range(0, tq, block_size):
            o_blk, lse_blk = _forward_query_block(sp, qs[:, i0:i0 + block_size], kc, vc, i0)
            out[:, i0:i0 + block_size] = o_blk
            lse[:, i0:i0 + block_size] = lse_blk
        result = _from_grouped(out, b, q.dtype)
        ctx.save_for_backward(q, k, v, result, lse, rel_bias, key_padding_mask)
        ctx.causal, ctx.block_size = causal, block_size  # type: ignore[attr-defined]
        return result

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor,
    ) -> tuple[Tensor | None, ...]:
        """Recompute tiles key block by key block to get dq, dk, dv and d rel_bias."""
        q, k, v, out, lse, rel_bias, kpm = ctx.saved_tensors  # type: ignore[attr-defined]
        b, h, tq, dh = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        block = ctx.block_size  # type: ignore[attr-defined]
        cdt = _compute_dtype(q.dtype)
        sp = _make_tiling(q, k, ctx.causal, rel_bias, kpm, block, cdt)  # type: ignore[attr-defined]
        scale = dh ** -0.5
        qs = _to_grouped(q, hkv, cdt, scale=scale)  # (N, Tq, G, Dh)
        do = _to_grouped(grad_out, hkv, cdt)
        delta = (do * _to_grouped(out, hkv, cdt)).sum(dim=-1)  # D = rowsum(dO * O), (N, Tq, G)
        kc = k.to(cdt).reshape(b * hkv, tk, dh).contiguous()  # (N, Tk, Dh)
        vc = v.to(cdt).reshape(b * hkv, tk, dh).contiguous()
        dq = torch.zeros_like(qs)
        dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)  # contiguous, like kc and vc
        need_rel = rel_bias is not None and ctx.needs_input_grad[3]
        drel = rel_bias.new_zeros(rel_bias.shape, dtype=cdt) if need_rel else None
        for j0 in range(0, tk, block):
            j1 = min(j0 + block, tk)
            grads = (dq, dk[:, j0:j1], dv[:, j0:j1], drel)  # block views, updated in place
            _backward_key_block(sp, qs, kc[:, j0:j1], vc[:, j0:j1], do, lse, delta, grads, j0)
        dq = _from_grouped(dq * scale, b, q.dtype)  # S was computed from q * scale
        dk = dk.view(b, hkv, tk, dh).to(k.dtype)
        dv = dv.view(b, hkv, tk, dh).to(v.dtype)
        drel = None if drel is None else drel.to(rel_bias.dtype)
        return dq, dk, dv, drel, None, None, None


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
    rel_bias: Tensor | None = None, key_padding_mask: Tensor | None = None,
    block_size: int = 128,
) -> Tensor:
    """Blockwise attention with O(T) memory; inputs are assumed validated.

    Args:
        q: Queries, (B, H, Tq, Dh).
        k: Keys, (B, Hkv, Tk, Dh) with H % Hkv == 0.
        v: Values, (B, Hkv, Tk, Dh).
        causal: Query i attends to keys j <= i.
        rel_bias: Offset bias (H, Tq + Tk - 1), indexed by j - i + Tq - 1.
        key_padding_mask: (B, Tk) bool, True for real tokens.
        block_size: Query and key tile length.

    Returns:
        Attention output, (B, H, Tq, Dh) in q's dtype.
    """
    return TiledAttention.apply(q, k, v, rel_bias, key_padding_mask, causal, block_size)
