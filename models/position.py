"""Positional schemes behind one interface.

A stack (encoder or decoder) owns one ``Position`` shared by all its layers and
calls three hooks, each an identity/no-op unless the scheme needs it:

* ``embed(x)``: add absolute positions to token embeddings (sinusoidal, learned).
* ``rotate(q, k)``: rotary embedding of queries and keys (rope).
* ``rel_bias(tq, tk)``: additive per-head score bias over offsets (relative, alibi).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from models.ops.attention import expand_rel_bias

POSITIONS = ("sinusoidal", "learned", "relative", "rope", "alibi", "none")

def _can_cache() -> bool:
    """Whether a cached table may be replaced; mutating buffers inside a compiled graph is avoided."""
    return not torch.compiler.is_compiling()

def _offsets(tq: int, tk: int, device: torch.device) -> Tensor:
    """Offsets ``j - i`` covered by ``rel_bias``: ``[-(tq - 1), tk - 1]``, shape ``(tq + tk - 1,)``."""
    return torch.arange(-(tq - 1), tk, device=device)

def rel_bias_matrix(out: Tensor, tq: int, tk: int) -> Tensor:
    """Expand a ``rel_bias`` vector ``(H, tq + tk - 1)`` to the full ``(H, tq, tk)`` score bias."""

    return expand_rel_bias(out, tq, tk)

class Position(nn.Module):
    """One positional scheme behind one interface; a stack (encoder or decoder) owns one, shared by its layers.

    The base class is the ``none`` scheme: every hook is an identity.
    """

    kind: str = "none"

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add absolute positions ``offset .. offset + T - 1`` to ``x`` of shape ``(B, T, D)``."""
        return x

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate ``q`` ``(B, H, Tq, Dh)`` and ``k`` ``(B, Hkv, Tk, Dh)``, both starting at position ``offset``."""
        return q, k

    def rel_bias(self, tq: int, tk: int) -> Tensor | None:
        """Additive bias ``(H, tq + tk - 1)`` with ``bias[h, i, j] = out[h, j - i + tq - 1]``, or None.

        Queries and keys are assumed to start at the same position. With a KV cache
        (queries are the last ``tq`` of ``tk`` positions), use ``rel_bias(tk, tk)``
        and keep the last ``tq`` rows of the expanded matrix.
        """
        return None

def sinusoidal_table(length: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """Vaswani et al. table ``(length, d_model)``: sin on even, cos on odd features, in fp32."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    inv = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )  # (ceil(D/2),)
    angle = pos * inv  # (T, ceil(D/2))
    table = torch.zeros(length, d_model, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angle)
    # An odd d_model has one fewer cos column than sin columns.
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table

class SinusoidalPosition(Position):
    """Fixed sinusoidal absolute positions; any length (the table grows on demand)."""

    kind = "sinusoidal"

    def __init__(self, d_model: int, max_len: int, scale: float = 1.0) -> None:
        super().__init__()
        self.d_model, self.scale = d_model, scale
        # Non-persistent: it is a pure function of the shape, so checkpoints need not carry it.
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def _table(self, length: int, device: torch.device) -> Tensor:
        table = self.table
        # Rebuild when too short, or when a model-wide .to(bf16) has degraded the fp32 cache.
        if length > table.shape[0] or table.dtype != torch.float32 or table.device != device:
            table = sinusoidal_table(max(length, table.shape[0]), self.d_model, device)
            if _can_cache():
                self.table = table
        return table

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.shape[1]
        table = self._table(offset + t, x.device)
        pos = table[offset : offset + t]
        if self.scale != 1.0:
            pos = pos * self.scale
        return x + pos.to(x.dtype)  # (T, D) broadcasts over B

class LearnedPosition(Position):
    """Trainable absolute positions; refuses sequences longer than ``max_len``.

    ``offset`` rows at the table's start are skipped: position ``p`` reads row ``offset + p``
    (RoBERTa's tables start at ``padding_idx + 1``), so the table has ``max_len + offset`` rows.
    """

    kind = "learned"

    def __init__(self, d_model: int, max_len: int, offset: int = 0) -> None:
        super().__init__()
        self.max_len, self.offset = max_len, offset
        self.emb = nn.Embedding(max_len + offset, d_model)
        # Unit-variance default init would swamp small token embeddings.
        nn.init.normal_(self.emb.weight, std=0.02)

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.shape[1]
        if offset + t > self.max_len:
            raise ValueError(
                f"position=learned was built for sequences of at most {self.max_len} tokens but got "
                f"{offset + t}; use position=rope, alibi or relative to run on longer sequences, "
                f"or raise data.seq_len"
            )
        start = self.offset + offset
        return x + self.emb.weight[start : start + t].to(x.dtype)  # (T, D) broadcasts over B

def relative_position_bucket(
    rel: Tensor, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """T5 bucketing of offsets ``rel = j - i`` (key minus query position).

    Half the buckets (per direction) hold exact small distances; the rest are
    log-spaced up to ``max_distance``, beyond which everything shares the last bucket.
    Bidirectional splits the buckets between negative and positive offsets; the
    unidirectional (causal) form maps every future offset to bucket 0.
    """
    rel = rel.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # fp64 keeps exact bucket boundaries (e.g. log(4)/log(16) == 0.5) identical on every device;
    # clamping avoids log(0) on the branch torch.where discards anyway.
    scaled = torch.log(dist.double().clamp(min=max_exact) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, large)

class RelativePosition(Position):
    """T5-style learned, bucketed relative bias per head; any length."""

    kind = "relative"

    def __init__(self, d_model: int, num_heads: int, causal: bool, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.bidirectional = not causal
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.emb = nn.Embedding(num_buckets, num_heads)
        # T5's init: N(0, 1) biases would rival the attention scores themselves at the start.
        nn.init.normal_(self.emb.weight, std=d_model**-0.5)

    def rel_bias(self, tq: int, tk: int) -> Tensor:
        rel = _offsets(tq, tk, self.emb.weight.device)
        buckets = relative_position_bucket(
            rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.emb(buckets).t().float()  # (L, H) -> (H, L)

def rope_tables(length: int, head_dim: int, base: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """fp32 ``cos``/``sin`` tables ``(length, head_dim)`` in the rotate-half layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, Dh): both halves share a frequency
    return emb.cos(), emb.sin()

def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

class RotaryPosition(Position):
    """Su et al. rotary embedding of queries and keys (rotate-half convention); any length."""

    kind = "rope"

    def __init__(self, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"position=rope needs an even head_dim but got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        cos, sin = rope_tables(max_len, head_dim, base)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_cached, self.sin_cached
        # Rebuild when too short, or when a model-wide .to(bf16) has degraded the fp32 cache.
        if length > cos.shape[0] or cos.dtype != torch.float32 or cos.device != device:
            cos, sin = rope_tables(max(length, cos.shape[0]), self.head_dim, self.base, device)
            if _can_cache():
                self.cos_cached, self.sin_cached = cos, sin
        return cos, sin

    def _rotate_one(self, x: Tensor, cos: Tensor, sin: Tensor, offset: int) -> Tensor:
        t = x.shape[-2]
        c = cos[offset : offset + t]  # (T, Dh), broadcasts over (B, H)
        s = sin[offset : offset + t]
        return (x.float() * c + _rotate_half(x.float()) * s).to(x.dtype)

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        cos, sin = self._tables(offset + max(q.shape[-2], k.shape[-2]), q.device)
        return self._rotate_one(q, cos, sin, offset), self._rotate_one(k, cos, sin, offset)

def alibi_slopes(num_heads: int) -> list[float]:
    """Press et al. head slopes: geometric from ``2^(-8/n)``; non-powers of 2 interleave the next power's slopes."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]

class AlibiPosition(Position):
    """ALiBi linear distance penalty ``-slope_h * |j - i|``; no parameters, any length.

    The symmetric form serves bidirectional encoders; under a causal mask only
    ``j <= i`` survives, where it equals the paper's ``slope * (j - i)``.
    """

    kind = "alibi"

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads), dtype=torch.float32), persistent=False)

    def rel_bias(self, tq: int, tk: int) -> Tensor:
        dist = _offsets(tq, tk, self.slopes.device).abs().float()  # (L,)
        return -self.slopes.float()[:, None] * dist[None, :]  # (H, L)

def build_position(
    kind: str,
    *,
    d_model: int,
    num_heads: int,
    head_dim: int,
    max_len: int,
    causal: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
    rope_base: float = 10000.0,
    sinusoidal_scale: float = 1.0,
    offset: int = 0,
) -> Position:
    """Build the positional scheme named ``kind`` (one of ``POSITIONS``).

    ``sinusoidal_scale`` multiplies the sinusoidal table (whose entries are sines and cosines of
    RMS 1/sqrt(2)), so positions can be put on the token embedding's scale. ``offset``: leading
    rows of a learned table that no position reads (RoBERTa's ``padding_idx + 1``).

    Raises:
        ValueError: Unknown ``kind``, or an odd ``head_dim`` for rope.
    """
    if kind == "sinusoidal":
        return SinusoidalPosition(d_model, max_len, sinusoidal_scale)
    if kind == "learned":
        return LearnedPosition(d_model, max_len, offset)
    if kind == "relative":
        return RelativePosition(d_model, num_heads, causal, num_buckets, max_distance)
    if kind == "rope":
        return RotaryPosition(head_dim, max_len, rope_base)
    if kind == "alibi":
        return AlibiPosition(num_heads)
    if kind == "none":
        return Position()
    raise ValueError(f"unknown position {kind!r}; valid: {', '.join(POSITIONS)}")
