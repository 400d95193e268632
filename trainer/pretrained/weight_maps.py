"""Hugging Face tensor names -> this trainer's state_dict, per family (see `families`).

Our attention has one fused QKV projection whose rows are [query; key; value] and a SwiGLU
feed-forward whose fused up-projection rows are [gate; value]; Hugging Face keeps them apart, so
they are concatenated along the output dimension. GPT-2's `Conv1D` stores weights (in, out) and
is transposed. RoBERTa's and GPT-2's tables are taken whole (the position offset is a model
setting). What has no counterpart is left out: BERT's pooler and masked-LM head transform,
RoBERTa's `lm_head`, buffers such as `position_ids` and GPT-2's causal `attn.bias`.
"""
from __future__ import annotations

import torch

from trainer.errors import ConfigError
from trainer.pretrained.families import BERT_TYPES, LLAMA_TYPES, ROBERTA_TYPES

ANCHORS = {**{t: "embeddings.word_embeddings.weight" for t in (*BERT_TYPES, *ROBERTA_TYPES)},
           "gpt2": "wte.weight", **{t: "embed_tokens.weight" for t in LLAMA_TYPES}}


class _Tensors:
    """The base model's tensors with any wrapper prefix (`bert.`, `model.`, `transformer.`) removed."""

    def __init__(self, weights: dict[str, torch.Tensor], model_type: str, where: str):
        anchor = ANCHORS[model_type]
        key = next((k for k in weights if k == anchor or k.endswith("." + anchor)), None)
        if key is None:
            raise ConfigError(f"model.init_from={where}: its weights have no {anchor}, so they are not a "
                              f"{model_type} checkpoint as its config.json says.")
        prefix = key[: len(key) - len(anchor)]
        self.w = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        self.head = weights.get("lm_head.weight")
        self.where = where

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.w:
            return self.w[name]
        old = name.replace(".weight", ".gamma").replace(".bias", ".beta")  # pre-2019 BERT LayerNorm names
        if "LayerNorm" in name and old in self.w:
            return self.w[old]
        raise ConfigError(f"model.init_from={self.where}: its weights lack {name}, which its config.json's "
                          f"architecture needs.")

    def has(self, name: str) -> bool:
        return name in self.w

    def cat(self, *names: str) -> torch.Tensor:
        return torch.cat([self(n) for n in names], dim=0)


def _bert(t: _Tensors, hf: dict) -> dict[str, torch.Tensor]:
    out = {"embed.weight": t("embeddings.word_embeddings.weight"),
           "encoder.position.emb.weight": t("embeddings.position_embeddings.weight"),
           "embed_types.weight": t("embeddings.token_type_embeddings.weight")}
    for k in ("weight", "bias"):
        out[f"encoder.embed_norm.{k}"] = t(f"embeddings.LayerNorm.{k}")
        for i in range(hf["num_hidden_layers"]):
            p, o = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
            out[f"{o}self_attn.qkv.{k}"] = t.cat(*(f"{p}attention.self.{n}.{k}" for n in ("query", "key", "value")))
            out[f"{o}self_attn.out.{k}"] = t(f"{p}attention.output.dense.{k}")
            out[f"{o}norm_attn.{k}"] = t(f"{p}attention.output.LayerNorm.{k}")
            out[f"{o}ffn.up.{k}"] = t(f"{p}intermediate.dense.{k}")
            out[f"{o}ffn.down.{k}"] = t(f"{p}output.dense.{k}")
            out[f"{o}norm_ffn.{k}"] = t(f"{p}output.LayerNorm.{k}")
    return out


def _gpt2(t: _Tensors, hf: dict) -> dict[str, torch.Tensor]:
    out = {"embed.weight": t("wte.weight"), "decoder.position.emb.weight": t("wpe.weight")}
    for k in ("weight", "bias"):
        out[f"decoder.final_norm.{k}"] = t(f"ln_f.{k}")
        for i in range(hf.get("n_layer", 12)):
            p, o = f"h.{i}.", f"decoder.blocks.{i}."
            conv = (lambda n: t(n).t()) if k == "weight" else t  # Conv1D: (in, out) -> Linear's (out, in)
            out[f"{o}norm_attn.{k}"] = t(f"{p}ln_1.{k}")
            out[f"{o}self_attn.qkv.{k}"] = conv(f"{p}attn.c_attn.{k}")  # columns already [q | k | v]
            out[f"{o}self_attn.out.{k}"] = conv(f"{p}attn.c_proj.{k}")
            out[f"{o}norm_ffn.{k}"] = t(f"{p}ln_2.{k}")
            out[f"{o}ffn.up.{k}"] = conv(f"{p}mlp.c_fc.{k}")
            out[f"{o}ffn.down.{k}"] = conv(f"{p}mlp.c_proj.{k}")
    return out


def _llama(t: _Tensors, hf: dict) -> dict[str, torch.Tensor]:
    out = {"embed.weight": t("embed_tokens.weight"), "decoder.final_norm.weight": t("norm.weight")}
    for i in range(hf["num_hidden_layers"]):
        p, o = f"layers.{i}.", f"decoder.blocks.{i}."
        out[f"{o}norm_attn.weight"] = t(f"{p}input_layernorm.weight")
        out[f"{o}norm_ffn.weight"] = t(f"{p}post_attention_layernorm.weight")
        out[f"{o}self_attn.qkv.weight"] = t.cat(*(f"{p}self_attn.{n}_proj.weight" for n in "qkv"))
        out[f"{o}self_attn.out.weight"] = t(f"{p}self_attn.o_proj.weight")
        out[f"{o}ffn.up.weight"] = t.cat(f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight")  # [gate; value]
        out[f"{o}ffn.down.weight"] = t(f"{p}mlp.down_proj.weight")
        if t.has(f"{p}self_attn.q_proj.bias"):
            out[f"{o}self_attn.qkv.bias"] = t.cat(*(f"{p}self_attn.{n}_proj.bias" for n in "qkv"))
        if t.has(f"{p}self_attn.o_proj.bias"):
            out[f"{o}self_attn.out.bias"] = t(f"{p}self_attn.o_proj.bias")
        if t.has(f"{p}mlp.down_proj.bias"):
            out[f"{o}ffn.up.bias"] = t.cat(f"{p}mlp.gate_proj.bias", f"{p}mlp.up_proj.bias")
            out[f"{o}ffn.down.bias"] = t(f"{p}mlp.down_proj.bias")
        if t.has(f"{p}self_attn.q_norm.weight"):
            out[f"{o}self_attn.q_norm.weight"] = t(f"{p}self_attn.q_norm.weight")
            out[f"{o}self_attn.k_norm.weight"] = t(f"{p}self_attn.k_norm.weight")
    return out


MAPS = {**{k: _bert for k in (*BERT_TYPES, *ROBERTA_TYPES)}, "gpt2": _gpt2, **{k: _llama for k in LLAMA_TYPES}}


def map_weights(weights: dict[str, torch.Tensor], hf: dict, where: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (Hugging Face names) -> this trainer's state_dict names and layouts.

    `hf` is the folder's config.json; an untied LM head (`lm_head.weight`) becomes `head.weight`.
    The embedding (and head) keep the checkpoint's row count; the caller fits them to the model's.

    Raises:
        ConfigError: a tensor the architecture needs is missing (one sentence naming it).
    """
    t = _Tensors(weights, hf["model_type"], where)
    out = MAPS[hf["model_type"]](t, hf)
    if t.head is not None:
        out["head.weight"] = t.head
    return out
