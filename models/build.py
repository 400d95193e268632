"""build_model: the one place a model is assembled from its config choices."""
from __future__ import annotations

import torch.nn as nn

from models.blocks import Block, FeedForward, MultiHeadAttention
from models.norm import build_norm
from models.position import build_position
from models.transformer import EMBED_STD, Stack, Transformer, init_weights, post_norm_head_scale

ARCHS = ("encoder", "decoder", "encoder_decoder")  # model=<arch>


def _stack(model_cfg, attention_cfg, position_cfg, norm_cfg, *, num_layers: int, causal: bool,
           cross: bool, max_len: int) -> Stack:
    m = model_cfg
    kv = m.num_kv_heads or m.num_heads

    def make_norm() -> nn.Module:
        return build_norm(norm_cfg.kind, m.d_model, eps=norm_cfg.eps)

    def make_attn(is_cross: bool) -> MultiHeadAttention:
        return MultiHeadAttention(m.d_model, m.num_heads, kv, attention_cfg.kind, attention_cfg.block_size,
                                  m.attn_dropout, cross=is_cross)

    blocks = [Block(make_attn(False), FeedForward(m.d_model, m.d_ff, m.activation), make_norm,
                    norm_cfg.placement, m.dropout, cross_attn=make_attn(True) if cross else None)
              for _ in range(num_layers)]
    position = build_position(position_cfg.kind, d_model=m.d_model, num_heads=m.num_heads,
                              head_dim=m.d_model // m.num_heads, max_len=max_len, causal=causal,
                              num_buckets=position_cfg.num_buckets, max_distance=position_cfg.max_distance,
                              rope_base=position_cfg.rope_base,
                              # Sinusoids (RMS 1/sqrt 2) on the token embedding's scale: the same
                              # token:position ratio as Vaswani et al.'s sqrt(d)-scaled embeddings.
                              sinusoidal_scale=EMBED_STD)
    # Pre-norm leaves the residual stream un-normalized: a final norm puts it on the head's scale.
    final = make_norm() if norm_cfg.placement == "pre" else None
    return Stack(blocks, position, final, causal=causal, dropout=m.dropout)


def build_model(model_cfg, attention_cfg, position_cfg, norm_cfg, *, vocab_size: int,
                max_len: int) -> Transformer:
    """Build an encoder, decoder or encoder-decoder transformer from its sub-configs.

    Args:
        model_cfg: `cfg.model` (arch and sizes). attention_cfg, position_cfg, norm_cfg: their groups.
        vocab_size: tokenizer vocabulary size. max_len: longest sequence (learned positions).
    """
    m = model_cfg
    kw = dict(model_cfg=m, attention_cfg=attention_cfg, position_cfg=position_cfg, norm_cfg=norm_cfg,
              max_len=max_len)
    encoder = decoder = None
    if m.arch in ("encoder", "encoder_decoder"):
        encoder = _stack(**kw, num_layers=m.num_layers, causal=False, cross=False)
    if m.arch in ("decoder", "encoder_decoder"):
        n = m.num_decoder_layers or m.num_layers if m.arch == "encoder_decoder" else m.num_layers
        decoder = _stack(**kw, num_layers=n, causal=True, cross=m.arch == "encoder_decoder")
    model = Transformer(m.arch, vocab_size, m.d_model, encoder, decoder, tie_embeddings=m.tie_embeddings,
                        head_scale=post_norm_head_scale(m.d_model, norm_cfg.placement, m.tie_embeddings))
    init_weights(model)
    return model


def num_params(model: nn.Module) -> int:
    """Trainable parameter count (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
