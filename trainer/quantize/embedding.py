"""Int8 weight-only quantization of the token embedding (`quantize.embeddings`).

An encoder's token table is a large share of it (all-MiniLM-L6-v2: 11.7 of its 22.6M parameters), so
8-bit quantization of the block linears alone shrinks the whole model by about 2x, not the 4x
that "int8 = -75%" promises. The table is quantized with torchao's `Int8WeightOnlyConfig` applied
to the `nn.Embedding` (torchao 0.18 supports it: the weight becomes an `Int8Tensor`, one int8 per
value with a symmetric fp32 scale per row, and the lookup dequantizes the rows it gathers), in
every quantization method: int4 methods keep the table at 8 bits too.

Default (`quantize.embeddings=null`): on for encoders, off for decoders and encoder-decoders,
whose LM head is tied to the table by default: their logits stay computed with full-precision
weights (the head is where int8 rounding moves the loss most). `quantize.embeddings=true` on a
decoder quantizes the table anyway and a tied head then multiplies by the same int8 weights
(dequantized in the GEMM); an untied head is a separate `nn.Linear` outside the blocks and stays
in full precision.
"""
from __future__ import annotations

import torch.nn as nn


def quantize_embeddings(setting: bool | None, model: nn.Module) -> bool:
    """Whether `model`'s token embedding is quantized: `setting` (quantize.embeddings) when given,
    else True for an encoder (model.arch == "encoder") and False otherwise."""
    if setting is not None:
        return bool(setting)
    return getattr(model, "arch", None) == "encoder"


def apply_embedding_int8(model: nn.Module, tq) -> nn.Module:
    """Quantize `model.embed` (the token table, an nn.Embedding) in place to int8 weight-only with
    torchao's Int8WeightOnlyConfig (`tq` = torchao.quantization); returns the model.

    Raises:
        TypeError: `model` has no `embed` nn.Embedding (not a model of this trainer).
    """
    table = getattr(model, "embed", None)
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"the model has no token embedding `embed` (nn.Embedding) to quantize, found {type(table)}")
    if type(table.weight) not in (nn.Parameter,) and hasattr(table.weight, "__tensor_flatten__"):
        return model  # already quantized
    tq.quantize_(model, tq.Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: m is table)
    return model
