"""Encoder, Decoder and EncoderDecoder models: embeddings, a stack of blocks, a tied LM head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.blocks import AttnCache, Block
from models.ops.linear import Linear, linear
from models.position import Position


class KVCache:
    """Incremental-decoding state of one stack: per block (self-attention, cross-attention)
    caches, and `length`, the number of positions already processed."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [(AttnCache(), AttnCache()) for _ in range(num_blocks)]
        self.length = 0


class Stack(nn.Module):
    """A sequence of blocks sharing one position scheme, with a final norm under pre-norm.

    `embed_norm` (BERT's embedding LayerNorm) normalizes the embeddings after the positions are
    added, before dropout and the first block; None: none.
    """

    def __init__(self, blocks: list[Block], position: Position, final_norm: nn.Module | None,
                 causal: bool, dropout: float, embed_norm: nn.Module | None = None):
        super().__init__()
        self.blocks, self.position, self.final_norm = nn.ModuleList(blocks), position, final_norm
        self.embed_norm = embed_norm
        self.causal = causal
        self.drop = nn.Dropout(dropout)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
        x = self.position.embed(x, offset=offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x, mask)
        return self.drop(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). With `cache`, `x` holds the positions after the `cache.length`
        already processed ones (all of a prompt at once, then one token per call)."""
        T = x.shape[1]
        if cache is None or cache.length == 0:
            causal = self.causal
            x = self._embed(x, mask)
            rel_bias = self.position.rel_bias(T, T)  # (H, 2T-1) or None: shared by every layer
        else:
            # The new query sees every cached key, so no causal mask is needed (nor would the
            # kernels' top-left-aligned one be right for Tq < Tk).
            assert T == 1, "after the first call, a cache takes one position per call"
            causal, offset = False, cache.length
            tk = offset + T
            x = self._embed(x, mask, offset=offset)
            rel_bias = self.position.rel_bias(tk, tk)  # offsets -(tk-1)..tk-1 between equal-length spans
            if rel_bias is not None:
                # Queries at offset..tk-1, keys at 0..tk-1: the kernel's entry m = j - i + T - 1 is
                # offset j - (offset + i) = m - (tk - 1), i.e. the first T + tk - 1 entries.
                rel_bias = rel_bias[:, : T + tk - 1]  # (H, T + tk - 1)
        for i, block in enumerate(self.blocks):
            x = block(x, self.position, causal=causal, mask=mask, rel_bias=rel_bias,
                      memory=memory, memory_mask=memory_mask,
                      cache=cache.blocks[i] if cache is not None else None)
        if cache is not None:
            cache.length += T
        return self.final_norm(x, mask) if self.final_norm is not None else x


class Transformer(nn.Module):
    """Token embedding + stack(s) + LM head tied to the embedding (or its own, untied).

    `vocab_size` is the embedding's row count (the tokenizer's vocabulary rounded up to a multiple
    of 64 for aligned GEMMs); `num_tokens` (None: all rows) is how many of them are real tokens:
    the head gives the rows beyond it a logit of -inf, so no loss, sampling or argmax can put any
    probability on a padding row. `token_types` > 0 adds a token-type embedding table (BERT's
    segment embeddings) whose row 0 is added to every token (one segment). `head_scale`
    multiplies the hidden states entering the head (`post_norm_head_scale`; 1.0 = none).
    `logit_softcap` (None: off) caps the logits to c * tanh(logits / c) (`logits`).
    """

    def __init__(self, arch: str, vocab_size: int, d_model: int, encoder: Stack | None,
                 decoder: Stack | None, tie_embeddings: bool = True, head_scale: float = 1.0,
                 num_tokens: int | None = None, token_types: int = 0, logit_softcap: float | None = None):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.arch, self.vocab_size, self.d_model = arch, vocab_size, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.embed_types = nn.Embedding(token_types, d_model) if token_types > 0 else None
        self.encoder, self.decoder = encoder, decoder
        self.head = None if tie_embeddings else Linear(d_model, vocab_size, bias=False)
        self.head_scale = head_scale
        self.num_tokens = vocab_size if num_tokens is None else num_tokens
        if not 0 < self.num_tokens <= vocab_size:
            raise ValueError(f"num_tokens={num_tokens} must be in 1..vocab_size={vocab_size}")
        # 0 on real rows, -inf on padding rows: added by the head's GEMM (no extra pass over the
        # logits). Not saved: a function of the shapes.
        bias = torch.zeros(vocab_size)
        bias[self.num_tokens:] = float("-inf")
        self.register_buffer("head_bias", bias if self.num_tokens < vocab_size else None, persistent=False)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # GPT-2 / nanoGPT: the embedding enters unscaled. (Scaling it by sqrt(d) as Vaswani et al.
        # do makes the residual stream the input token's own vector at init, and the tied head then
        # predicts the input token with a logit of ~sqrt(d): a step-1 loss of ~11 nats, not ln V.)
        x = self.embed(tokens)  # (B, T, D)
        if self.embed_types is not None:
            x = x + self.embed_types.weight[0]  # token type 0 everywhere: one segment
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., vocab) logits; rows from `num_tokens` on are -inf.

        With `logit_softcap` c the logits are c * tanh(logits / c) (Gemma 2, Team et al. 2024;
        modded-nanogpt): bounded in (-c, c), ~unchanged while small (so the untrained loss stays
        ~ln V). Every caller (loss, evaluation, generation) gets its logits here.
        """
        weight = self.embed.weight if self.head is None else self.head.weight
        if self.head_scale != 1.0:
            hidden = hidden * self.head_scale  # (..., D): cheaper than scaling (..., V) logits
        if self.logit_softcap is not None:
            c = self.logit_softcap
            out = c * torch.tanh(linear(hidden, weight) / c)  # (..., V)
            # The padding rows' -inf is added after the cap (tanh would turn it into -c).
            return out if self.head_bias is None else out + self.head_bias.to(out.dtype)
        if self.head_bias is None:
            return linear(hidden, weight)
        return linear(hidden, weight, self.head_bias.to(weight.dtype))

    def new_cache(self) -> KVCache:
        """An empty KV cache for `decode` (decoder and encoder_decoder)."""
        assert self.decoder is not None, f"model={self.arch} has no decoder"
        return KVCache(len(self.decoder.blocks))

    def decode(self, tokens: torch.Tensor, cache: KVCache | None = None, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits (B, T, V) for `tokens` (B, T), optionally cross-attending to `memory`.

        Without `cache` this is `forward` (decoder) or its decoder half (encoder_decoder). With
        one, `tokens` continue the cached positions and the cache is extended: feed the prompt,
        then one token per call.
        """
        assert self.decoder is not None, f"model={self.arch} has no decoder"
        return self.logits(self.decoder(self._embed(tokens), None, memory=memory, memory_mask=memory_mask,
                                        cache=cache))

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional encoder states (B, S, D); `mask` (B, S) is True at real tokens."""
        assert self.encoder is not None, f"model={self.arch} has no encoder"
        return self.encoder(self._embed(tokens), mask)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                target: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """Logits (or hidden states with `head=False`) of the last stack.

        encoder/decoder: `tokens` (B, T) -> (B, T, V). encoder_decoder: `tokens` is the source,
        `target` the decoder input (B, U) -> (B, U, V), cross-attending to the encoded source.
        `select` (bool, same shape as the output's first two dims) keeps only those rows -> (N, V),
        so a masked LM projects just the positions it predicts. The head runs inside forward so
        DDP/FSDP hooks see every parameter use.
        """
        if self.arch == "encoder":
            hidden = self.encode(tokens, mask)
        elif self.arch == "decoder":
            hidden = self.decoder(self._embed(tokens), mask)
        else:
            assert target is not None, "model=encoder_decoder needs a target sequence"
            memory = self.encode(tokens, mask)
            hidden = self.decoder(self._embed(target), target_mask, memory=memory, memory_mask=mask)
        if select is not None:
            hidden = hidden[select]  # (N, D)
        return self.logits(hidden) if head else hidden


EMBED_STD = 0.02  # GPT-2's init std for token (and learned position) embeddings


def post_norm_head_scale(d_model: int, placement: str, tied: bool, embed_std: float = EMBED_STD) -> float:
    """The factor on the hidden states entering a tied LM head: min(1, 1 / (embed_std * d_model))
    under post-norm, 1.0 otherwise.

    Why: post-norm's last sublayer ends in a norm, and at init every sublayer's output is small
    next to the residual it is added to, so the stack's output is the *input* token's embedding
    rescaled to unit RMS, h = E[tok] / embed_std. Through the tied head that token then scores
    h . E[tok] = embed_std * d_model (7.7 at d 384) while the others score ~N(0, embed_std^2 d):
    the untrained model confidently predicts its input, up to 1.7 nats above ln(vocab). Because h
    is *aligned* with a head row, that logit grows like d, not sqrt(d), so the head's multiplier
    scales like 1/d: muP's readout rule (Yang et al. 2022, Tensor Programs V: output logits times
    1/width), here normalised so the input token's logit at init is at most 1 (loss within ~0.5
    nats of ln V). Small widths (embed_std * d <= 1, d <= 50) are left unscaled, so they learn as
    fast as before. Pre-norm needs no factor: its sublayer outputs outweigh the 0.02-std embedding
    in the residual, so its final norm's output is not the input token's direction; an untied head
    is random, not aligned with h.
    """
    if placement != "post" or not tied:
        return 1.0
    return min(1.0, 1.0 / (embed_std * d_model))


def init_weights(model: Transformer) -> None:
    """GPT-2 init (Radford et al. 2019; nanoGPT's `_init_weights`): every linear and the token
    embedding N(0, 0.02), biases zero, and the projections that write into a stack's residual
    stream (attention `out`, feed-forward `down`) N(0, 0.02 / sqrt(2 * L)) with L the number of
    blocks of *that* stack, so the stream's variance does not grow with its depth (an encoder-
    decoder's encoder and decoder each count their own blocks).

    Only linear layers and the token embedding: norms and position modules keep their own init
    (learned positions N(0, 0.02); the sinusoidal table is scaled to the embedding's std by
    `models.build`).
    """
    nn.init.normal_(model.embed.weight, std=EMBED_STD)
    if model.embed_types is not None:
        nn.init.normal_(model.embed_types.weight, std=EMBED_STD)  # BERT's init for its segment table
    depth = {}
    for stack in (model.encoder, model.decoder):
        if stack is not None:
            depth.update({id(m): len(stack.blocks) for m in stack.modules()})
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            residual_out = name.endswith((".out", ".down")) and id(module) in depth
            std = EMBED_STD / math.sqrt(2 * depth[id(module)]) if residual_out else EMBED_STD
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
