"""Hugging Face `config.json` -> this trainer's model/position/norm settings, per model family.

Families: BERT (`bert`, and MiniLM, which is saved as `bert`), RoBERTa (`roberta`, `xlm-roberta`,
`camembert`: BERT with positions offset by `pad_token_id + 1`), GPT-2 (`gpt2`) and the Llama
family (`llama`, `mistral`, `qwen2` with q/k/v biases, `qwen3` with q/k RMS norms). Each setting
comes with what it was read from, so a contradicting override can be refused naming both values.

T5 is not imported yet. Its pieces mostly exist (model=encoder_decoder, position=relative with
T5's buckets, rmsnorm, model.head_dim for d_kv, model.head_scale for the tied head's
d_model**-0.5): T5 v1.0 (ReLU) would need only a weight map that scales the query projection by
sqrt(d_kv), since T5's attention has no 1/sqrt(head_dim) factor; T5 v1.1 / Flan-T5 also need a
GELU-gated feed-forward, which `model.activation` does not offer.
"""
from __future__ import annotations

from trainer.errors import ConfigError

BERT_TYPES = ("bert",)
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = (*BERT_TYPES, *ROBERTA_TYPES, "gpt2", *LLAMA_TYPES)
# Hugging Face activation names -> model.activation.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu"}

Setting = tuple[object, str]  # (value, what it was read from: "hidden_size 384")


def _field(hf: dict, name: str, default=None) -> Setting:
    value = hf.get(name, default)
    if value is None:
        raise ConfigError(f"the pretrained config.json has no {name}, which a {hf.get('model_type')} model needs.")
    return value, f"{name} {value}"


def _fixed(hf: dict, value) -> Setting:
    return value, f"{hf.get('model_type')} architecture's {value}"


def _activation(hf: dict, name: str) -> Setting:
    act = hf.get(name)
    if act not in ACTIVATIONS:
        raise ConfigError(f"the pretrained config.json's {name}={act!r} has no counterpart here; supported: "
                          f"{', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[act], f"{name} {act}"


def _refuse(hf: dict, what: str) -> None:
    raise ConfigError(f"the pretrained {hf.get('model_type')} model uses {what}, which this trainer's models "
                      f"cannot reproduce.")


def _common(hf: dict) -> dict[str, Setting]:
    """The architecture keys every family sets (the from-scratch defaults, read as the folder's)."""
    return {key: _fixed(hf, value) for key, value in {
        "model.num_kv_heads": None, "model.num_decoder_layers": None, "model.head_dim": None,
        "model.bias": False, "model.qkv_bias": False, "model.qk_norm": False, "model.embed_norm": False,
        "model.token_types": 0, "model.max_positions": None, "model.position_offset": 0,
        "model.head_scale": 1.0, "model.tie_embeddings": True}.items()}


def _bert(hf: dict) -> dict[str, Setting]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        _refuse(hf, f"position_embedding_type={hf['position_embedding_type']}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        _refuse(hf, "a decoder configuration (is_decoder / add_cross_attention)")
    roberta = hf.get("model_type") in ROBERTA_TYPES
    pad = hf.get("pad_token_id", 1)
    return {
        "model.arch": ("encoder", f"model_type {hf.get('model_type')} (an encoder)"),
        "model.d_model": _field(hf, "hidden_size"), "model.num_layers": _field(hf, "num_hidden_layers"),
        "model.num_heads": _field(hf, "num_attention_heads"), "model.d_ff": _field(hf, "intermediate_size"),
        "model.activation": _activation(hf, "hidden_act"), "model.bias": _fixed(hf, True),
        "model.embed_norm": _fixed(hf, True), "model.token_types": _field(hf, "type_vocab_size", 2),
        "model.max_positions": _field(hf, "max_position_embeddings"),
        "model.position_offset": (pad + 1, f"pad_token_id {pad} (RoBERTa positions start at pad_token_id + 1)")
        if roberta else _fixed(hf, 0),
        "model.tie_embeddings": _field(hf, "tie_word_embeddings", True),
        "position.kind": _fixed(hf, "learned"), "norm.kind": _fixed(hf, "layernorm"),
        "norm.placement": _fixed(hf, "post"), "norm.eps": _field(hf, "layer_norm_eps", 1e-12),
    }


def _gpt2(hf: dict) -> dict[str, Setting]:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        _refuse(hf, "attention scaled other than by 1/sqrt(head_dim)")
    if hf.get("add_cross_attention"):
        _refuse(hf, "cross-attention (add_cross_attention)")
    d = hf.get("n_embd", 768)
    inner = hf.get("n_inner") or 4 * d
    return {
        "model.arch": ("decoder", "model_type gpt2 (a decoder)"),
        "model.d_model": _field(hf, "n_embd", 768), "model.num_layers": _field(hf, "n_layer", 12),
        "model.num_heads": _field(hf, "n_head", 12), "model.d_ff": (inner, f"n_inner {inner}"),
        "model.activation": _activation(hf, "activation_function"), "model.bias": _fixed(hf, True),
        "model.max_positions": _field(hf, "n_positions", 1024),
        "model.tie_embeddings": _field(hf, "tie_word_embeddings", True),
        "position.kind": _fixed(hf, "learned"), "norm.kind": _fixed(hf, "layernorm"),
        "norm.placement": _fixed(hf, "pre"), "norm.eps": _field(hf, "layer_norm_epsilon", 1e-5),
    }


def rope_theta(hf: dict) -> float:
    """The rotary base of a Llama-family config (`rope_theta`, or `rope_parameters.rope_theta`);
    refuses scaled rotary embeddings (`rope_scaling` / a `rope_type` other than default)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        _refuse(hf, f"rope_type={kind} (scaled rotary embeddings)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama(hf: dict) -> dict[str, Setting]:
    kind = hf.get("model_type")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(hf, f"hidden_act={hf.get('hidden_act')} (the SwiGLU feed-forward here uses silu)")
    if hf.get("use_sliding_window"):
        _refuse(hf, "use_sliding_window=true (sliding-window attention)")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias if kind == "llama" else attn_bias or mlp_bias:
        _refuse(hf, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (biases on some linear layers only)")
    d, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    head_dim = hf.get("head_dim") or (d // heads if d and heads else None)
    theta = rope_theta(hf)
    return {
        "model.arch": ("decoder", f"model_type {kind} (a decoder)"),
        "model.d_model": _field(hf, "hidden_size"), "model.num_layers": _field(hf, "num_hidden_layers"),
        "model.num_heads": _field(hf, "num_attention_heads"),
        "model.num_kv_heads": _field(hf, "num_key_value_heads", heads),
        "model.head_dim": (head_dim, f"head_dim {head_dim}"), "model.d_ff": _field(hf, "intermediate_size"),
        "model.activation": ("swiglu", f"hidden_act silu ({kind}'s gated feed-forward)"),
        "model.bias": (attn_bias, f"attention_bias {attn_bias}"),
        "model.qkv_bias": _fixed(hf, kind == "qwen2"), "model.qk_norm": _fixed(hf, kind == "qwen3"),
        "model.tie_embeddings": _field(hf, "tie_word_embeddings", False),
        "position.kind": _fixed(hf, "rope"), "position.rope_base": (theta, f"rope_theta {theta}"),
        "norm.kind": _fixed(hf, "rmsnorm"), "norm.placement": _fixed(hf, "pre"),
        "norm.eps": _field(hf, "rms_norm_eps", 1e-6),
    }


def family_settings(hf: dict) -> dict[str, Setting]:
    """Every model/position/norm key a config.json determines, as (value, where it came from).

    Raises:
        ConfigError: an unsupported `model_type`, or a feature of it the models lack (one sentence).
    """
    kind = hf.get("model_type")
    if kind in BERT_TYPES or kind in ROBERTA_TYPES:
        own = _bert(hf)
    elif kind == "gpt2":
        own = _gpt2(hf)
    elif kind in LLAMA_TYPES:
        own = _llama(hf)
    else:
        raise ConfigError(f"the pretrained folder's model_type {kind!r} is not supported; supported families: "
                          f"{', '.join(SUPPORTED)}.")
    return _common(hf) | own | {"model.num_tokens": _field(hf, "vocab_size")}


def sliding_window(hf: dict) -> int | None:
    """Mistral's attention window (None: none); sequences up to it attend exactly as full attention."""
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    return int(window) if window else None
