"""Transformer building blocks: attention layers, feed-forward, and one residual block.

Submodules (norms, the position scheme) are passed in by `models/build.py`, so a block never
branches on config strings beyond the few structural choices it owns (pre/post placement).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.norm import RMSNorm
from models.ops.attention import attention
from models.ops.linear import Linear
from models.position import Position


class AttnCache:
    """Keys and values one attention layer has already computed, for incremental decoding.

    Self-attention appends each step's (B, Hkv, T, Dh) keys/values into a buffer that doubles
    when full (O(1) amortized per token, no per-step copy of the whole history); cross-attention
    stores the projected encoder memory once (`static`), so later steps skip the projection.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # filled positions along dim 2
        self.static = False  # cross-attention: k/v are the whole memory, never appended to

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, Hkv, T, Dh) keys/values after the cached ones; returns all of them so far."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2] or self.k.dtype != k.dtype:
            cap = max(end, 2 * (self.k.shape[2] if self.k is not None else 0), 16)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(new_k.shape)
            if self.k is not None and self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Multi-head (optionally grouped-query) self- or cross-attention.

    Self-attention uses one fused QKV projection (one GEMM instead of three; its rows are the
    query, key and value projections in that order); cross-attention projects queries from `x`
    and a fused KV from the encoder memory.

    `head_dim` (None: d_model // num_heads) may differ from d_model / num_heads (Qwen3, T5).
    `qkv_bias` adds biases to the q/k/v projections (Qwen2), `out_bias` to the output projection
    (with both: BERT, GPT-2). `qk_norm` RMS-normalizes each head's queries and keys over its
    head_dim before the rotary embedding (Qwen3; Dehghani et al. 2023, "Scaling Vision
    Transformers to 22B Parameters"), with `norm_eps`; the cache holds the normalized keys.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, kernel: str,
                 block_size: int, attn_dropout: float, cross: bool = False, *, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.h, self.hkv, self.dh = num_heads, num_kv_heads, head_dim or d_model // num_heads
        self.kernel, self.block_size, self.attn_dropout, self.cross = kernel, block_size, attn_dropout, cross
        self.head_start = 0  # tensor parallelism: this rank's first head (its slice of a per-head rel_bias)
        if cross:
            self.q = Linear(d_model, self.h * self.dh, bias=qkv_bias)
            self.kv = Linear(d_model, 2 * self.hkv * self.dh, bias=qkv_bias)
        else:
            self.qkv = Linear(d_model, (self.h + 2 * self.hkv) * self.dh, bias=qkv_bias)
        self.out = Linear(self.h * self.dh, d_model, bias=out_bias)
        self.q_norm = RMSNorm(self.dh, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.dh, norm_eps) if qk_norm else None

    def _norm_qk(self, q: torch.Tensor | None, k: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """RMS-normalize (B, H, T, Dh) queries / (B, Hkv, T, Dh) keys per head when qk_norm is on."""
        if self.q_norm is None:
            return q, k
        return (None if q is None else self.q_norm(q)), (None if k is None else self.k_norm(k))

    def forward(self, x: torch.Tensor, position: Position, *, causal: bool,
                key_padding_mask: torch.Tensor | None = None, rel_bias: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, cache: AttnCache | None = None) -> torch.Tensor:
        """Attend from `x` (B, T, D) to itself or to `memory` (B, S, D).

        With `cache`, self-attention's `x` holds the tokens after the `cache.length` cached
        ones: they are rotated at their absolute positions, appended, and attend to every cached
        key (the caller passes the matching `causal` and `rel_bias`); cross-attention projects
        `memory` on the first call only.
        """
        B, T, _ = x.shape
        if memory is None:
            qkv = self.qkv(x).view(B, T, self.h + 2 * self.hkv, self.dh).transpose(1, 2)  # (B, H+2Hkv, T, Dh)
            q, k, v = qkv.split([self.h, self.hkv, self.hkv], dim=1)
            q, k = self._norm_qk(q, k)
            if cache is None:
                q, k = position.rotate(q, k)
            else:
                q, k = position.rotate(q, k, offset=cache.length)  # absolute positions of the new tokens
                k, v = cache.append(k, v)  # (B, Hkv, cached + T, Dh)
        else:
            q = self._norm_qk(self.q(x).view(B, T, self.h, self.dh).transpose(1, 2), None)[0]  # (B, H, T, Dh)
            if cache is not None and cache.static:
                k, v = cache.k, cache.v
            else:
                S = memory.shape[1]
                kv = self.kv(memory).view(B, S, 2 * self.hkv, self.dh).transpose(1, 2)  # (B, 2Hkv, S, Dh)
                k, v = kv.split([self.hkv, self.hkv], dim=1)
                k = self._norm_qk(None, k)[1]
                if cache is not None:
                    cache.k, cache.v, cache.length, cache.static = k, v, S, True
        if rel_bias is not None and rel_bias.shape[0] != self.h:  # tensor parallel: this rank's heads
            rel_bias = rel_bias[self.head_start: self.head_start + self.h]
        y = attention(q, k, v, kernel=self.kernel, causal=causal, rel_bias=rel_bias,
                      key_padding_mask=key_padding_mask,
                      dropout_p=self.attn_dropout if self.training else 0.0, block_size=self.block_size)
        return self.out(y.transpose(1, 2).reshape(B, T, self.h * self.dh))  # (B, T, D)


ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "swiglu")  # model.activation
PLACEMENTS = ("pre", "post")  # norm.placement


class FeedForward(nn.Module):
    """Position-wise MLP: GELU (exact erf, or `gelu_tanh`: the tanh approximation of GPT-2's
    `gelu_new`), ReLU, ReLU squared (`relu2`: Primer, So et al. 2021), or SwiGLU (Shazeer 2020):
    one fused up-projection whose first d_ff rows are the gate and the last d_ff the value,
    down(silu(gate) * value). `bias` adds biases to both."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation = activation
        self.up = Linear(d_model, (2 if activation == "swiglu" else 1) * d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "relu2":
            h = F.relu(h).square()  # ReLU squared (So et al. 2021, "Primer"; modded-nanogpt)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)  # exact erf GELU: about 2x faster than the tanh form on CPU (fwd+bwd)
        return self.down(h)


class Block(nn.Module):
    """One residual block: self-attention, optional cross-attention, feed-forward.

    `placement="pre"` normalizes each sublayer's input (x + f(norm(x))); `"post"` normalizes
    the residual sum (norm(x + f(x))), as in the original Transformer.
    """

    def __init__(self, self_attn: MultiHeadAttention, ffn: FeedForward, make_norm: Callable[[], nn.Module],
                 placement: str, dropout: float, cross_attn: MultiHeadAttention | None = None):
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.norm_attn, self.norm_ffn = make_norm(), make_norm()
        self.norm_cross = make_norm() if cross_attn is not None else None
        self.pre = placement == "pre"
        self.drop = nn.Dropout(dropout)

    def _sublayer(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], norm: nn.Module,
                  mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre:
            return x + self.drop(f(norm(x, mask)))
        return norm(x + self.drop(f(x)), mask)

    def forward(self, x: torch.Tensor, position: Position, *, causal: bool, mask: torch.Tensor | None = None,
                rel_bias: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None,
                cache: tuple[AttnCache, AttnCache] | None = None) -> torch.Tensor:
        """`cache`: (self-attention, cross-attention) caches for incremental decoding, or None."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self._sublayer(x, lambda h: self.self_attn(h, position, causal=causal, key_padding_mask=mask,
                                                       rel_bias=rel_bias, cache=self_cache), self.norm_attn, mask)
        if self.cross_attn is not None:
            x = self._sublayer(x, lambda h: self.cross_attn(h, position, causal=False, key_padding_mask=memory_mask,
                                                            memory=memory, cache=cross_cache), self.norm_cross, mask)
        return self._sublayer(x, self.ffn, self.norm_ffn, mask)
