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
    head_dim = _get(m, "head_dim", None) or m.d_model // m.num_heads
    bias = _get(m, "bias", False)

    def make_norm() -> nn.Module:
        return build_norm(norm_cfg.kind, m.d_model, eps=norm_cfg.eps)

    def make_attn(is_cross: bool) -> MultiHeadAttention:
        return MultiHeadAttention(m.d_model, m.num_heads, kv, attention_cfg.kind, attention_cfg.block_size,
                                  m.attn_dropout, cross=is_cross, head_dim=head_dim,
                                  qkv_bias=bias or _get(m, "qkv_bias", False), out_bias=bias,
                                  qk_norm=_get(m, "qk_norm", False), norm_eps=norm_cfg.eps)

    blocks = [Block(make_attn(False), FeedForward(m.d_model, m.d_ff, m.activation, bias=bias), make_norm,
                    norm_cfg.placement, m.dropout, cross_attn=make_attn(True) if cross else None)
              for _ in range(num_layers)]
    # A learned table of model.max_positions rows (e.g. a checkpoint's max_position_embeddings),
    # of which the first model.position_offset are never read; else one row per position of max_len.
    offset, rows = _get(m, "position_offset", 0), _get(m, "max_positions", None)
    position = build_position(position_cfg.kind, d_model=m.d_model, num_heads=m.num_heads,
                              head_dim=head_dim, max_len=rows - offset if rows else max_len, causal=causal,
                              num_buckets=position_cfg.num_buckets, max_distance=position_cfg.max_distance,
                              rope_base=position_cfg.rope_base,
                              # Sinusoids (RMS 1/sqrt 2) on the token embedding's scale: the same
                              # token:position ratio as Vaswani et al.'s sqrt(d)-scaled embeddings.
                              sinusoidal_scale=EMBED_STD, offset=offset)
    # Pre-norm leaves the residual stream un-normalized: a final norm puts it on the head's scale.
    final = make_norm() if norm_cfg.placement == "pre" else None
    embed_norm = make_norm() if _get(m, "embed_norm", False) else None
    return Stack(blocks, position, final, causal=causal, dropout=m.dropout, embed_norm=embed_norm)


def _get(cfg, key: str, default):
    """`cfg.key`, or `default` for a config saved before the key existed."""
    value = getattr(cfg, key, default) if not hasattr(cfg, "get") else cfg.get(key, default)
    return default if value is None and default is not None else value


def build_model(model_cfg, attention_cfg, position_cfg, norm_cfg, *, vocab_size: int,
                max_len: int, num_tokens: int | None = None) -> Transformer:
    """Build an encoder, decoder or encoder-decoder transformer from its sub-configs.

    Args:
        model_cfg: `cfg.model` (arch and sizes). attention_cfg, position_cfg, norm_cfg: their groups.
        vocab_size: embedding rows (the tokenizer's vocabulary rounded up to a multiple of 64).
        max_len: longest sequence (learned positions, unless model.max_positions sets the table).
        num_tokens: the tokenizer's real vocabulary (None: every row); the head's logits of the
            rows beyond it (or beyond model.num_tokens, if smaller) are -inf.
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
    head_scale = _get(m, "head_scale", None)
    if head_scale is None:
        head_scale = post_norm_head_scale(m.d_model, norm_cfg.placement, m.tie_embeddings)
    # The head predicts the ids below every bound given: the rows, the tokenizer's, model.num_tokens.
    num_tokens = min(n for n in (vocab_size, num_tokens, _get(m, "num_tokens", None)) if n is not None)
    model = Transformer(m.arch, vocab_size, m.d_model, encoder, decoder, tie_embeddings=m.tie_embeddings,
                        head_scale=head_scale, num_tokens=num_tokens, token_types=_get(m, "token_types", 0),
                        logit_softcap=_get(m, "logit_softcap", None))
    init_weights(model)
    return model


def num_params(model: nn.Module) -> int:
    """Trainable parameter count (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
