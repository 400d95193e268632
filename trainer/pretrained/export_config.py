"""A run's architecture -> a Hugging Face family and its `config.json`: the inverse of `families`.

Which family a run maps to, decided per feature (the first feature without a counterpart is
refused in one sentence naming it):

| run | family |
|---|---|
| model=encoder, norm=layernorm, norm.placement=post, model.embed_norm=true, gelu/gelu_tanh/relu | BERT (RoBERTa when model.position_offset > 0) |
| model=decoder, position=rope, norm=rmsnorm (pre), activation=swiglu | Llama (Qwen2 with model.qkv_bias, Qwen3 with model.qk_norm) |
| model=decoder, absolute or no positions, norm=layernorm (pre), gelu/gelu_tanh/relu | GPT-2 |

Exact conversions, not refusals: biases a family always has but the run lacks are written as
zeros (BERT's and GPT-2's every linear, Qwen3's output projection); a run without token types
gets BERT's one all-zero token-type row; position=sinusoidal becomes the learned table holding
its values (data.seq_len rows), position=none (GPT-2, BERT) an all-zero table. Refused:
model=encoder_decoder (T5 is not a supported family), position=alibi|relative, norm=batchnorm,
pre-norm encoders, post-norm decoders, grouped-query attention or a head_dim other than
d_model / num_heads outside the Llama family, an embedding norm or token types on a decoder,
model.logit_softcap, and a head scale other than 1 on a decoder (the LM head multiplies
nothing in these families).
"""
from __future__ import annotations

from omegaconf import DictConfig

from trainer.errors import ConfigError

# model.activation -> the Hugging Face name (BERT's hidden_act, GPT-2's activation_function).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
ABSOLUTE = ("learned", "sinusoidal", "none")  # positions a learned table reproduces exactly


class Unmappable(ConfigError):
    """A run feature with no counterpart in the family its architecture points to."""


def _refuse(feature: str, family: str, why: str) -> None:
    raise Unmappable(f"{feature} has no counterpart in a {family} checkpoint ({why}), so this run cannot be "
                     f"exported as a Hugging Face model")


def _head_dim(m) -> int:
    return m.head_dim or m.d_model // m.num_heads


def table_rows(cfg: DictConfig) -> int:
    """Rows of the exported absolute position table: the run's learned table (model.max_positions,
    offset rows included), else data.seq_len rows."""
    m = cfg.model
    if cfg.position.kind == "learned":
        return int(m.max_positions or cfg.data.seq_len + m.position_offset)
    return int(cfg.data.seq_len)


def max_input_length(cfg: DictConfig) -> int:
    """The longest input the exported model takes: data.seq_len, within its position table."""
    if cfg.position.kind == "rope":
        return int(cfg.data.seq_len)
    return min(int(cfg.data.seq_len), table_rows(cfg) - int(cfg.model.position_offset or 0))


def _check_common(cfg: DictConfig, family: str) -> None:
    m = cfg.model
    if m.get("logit_softcap") is not None:
        _refuse(f"model.logit_softcap={m.logit_softcap}", family, "its logits are not soft-capped")
    if cfg.norm.kind == "batchnorm":
        _refuse("norm=batchnorm", family, "its norms are per token")


def _check_plain_attention(cfg: DictConfig, family: str) -> None:
    m = cfg.model
    if m.qk_norm:
        _refuse("model.qk_norm=true", family, "its attention has no query/key norm")
    if m.num_kv_heads not in (None, m.num_heads):
        _refuse(f"model.num_kv_heads={m.num_kv_heads}", family, "every head has its own keys and values")
    if m.d_model % m.num_heads or _head_dim(m) != m.d_model // m.num_heads:
        _refuse(f"model.head_dim={m.head_dim}", family, "its head size is hidden_size / num_attention_heads")
    if m.activation not in HF_ACTIVATIONS:
        _refuse(f"model.activation={m.activation}", family, f"its feed-forward is one of {', '.join(HF_ACTIVATIONS)}")
    if cfg.norm.kind != "layernorm":
        _refuse(f"norm={cfg.norm.kind}", family, "its norms are LayerNorm")


def encoder_family(cfg: DictConfig, pad_id: int) -> str:
    """`bert` or `roberta` for an encoder run, or Unmappable naming the first feature without one."""
    m = cfg.model
    family = "roberta" if m.position_offset else "bert"
    _check_common(cfg, "BERT")
    _check_plain_attention(cfg, "BERT")
    if cfg.position.kind not in ABSOLUTE:
        _refuse(f"position={cfg.position.kind}", "BERT", "its positions are a learned table added to the embeddings")
    if cfg.norm.placement != "post":
        _refuse("norm.placement=pre", "BERT", "it normalizes after each residual sum (post-norm)")
    if not m.embed_norm:
        _refuse("model.embed_norm=false", "BERT", "its embeddings always pass a LayerNorm")
    if family == "roberta" and pad_id != m.position_offset - 1:
        _refuse(f"model.position_offset={m.position_offset} with pad id {pad_id}", "RoBERTa",
                "its positions start at pad_token_id + 1")
    return family


def decoder_family(cfg: DictConfig) -> str:
    """`gpt2`, `llama`, `qwen2` or `qwen3` for a decoder run, or Unmappable naming the feature."""
    m, pos = cfg.model, cfg.position.kind
    if pos == "rope":
        family = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias and not m.bias else "llama"
        name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
        _check_common(cfg, name)
        if cfg.norm.kind != "rmsnorm":
            _refuse(f"norm={cfg.norm.kind} with position=rope", name, "its norms are RMSNorm")
        if m.activation != "swiglu":
            _refuse(f"model.activation={m.activation} with position=rope", name, "its feed-forward is SwiGLU")
        if family == "qwen3" and m.bias:
            _refuse("model.bias=true with model.qk_norm=true", name, "its feed-forward has no biases")
    elif pos in ABSOLUTE:
        family, name = "gpt2", "GPT-2"
        _check_common(cfg, name)
        _check_plain_attention(cfg, name)
        if m.position_offset:
            _refuse(f"model.position_offset={m.position_offset}", name, "its positions start at row 0")
    else:
        _refuse(f"position={pos}", "Hugging Face decoder", "GPT-2 uses learned positions, the Llama family rotary")
    if cfg.norm.placement != "pre":
        _refuse("norm.placement=post", name, "it normalizes each sublayer's input (pre-norm)")
    if m.embed_norm:
        _refuse("model.embed_norm=true", name, "its embeddings enter the first block un-normalized")
    if m.token_types:
        _refuse(f"model.token_types={m.token_types}", name, "it has no token-type embedding")
    if m.head_scale not in (None, 1.0):
        _refuse(f"model.head_scale={m.head_scale}", name, "its LM head takes the final norm's output as is")
    return family


def export_family(cfg: DictConfig, pad_id: int) -> str:
    """The Hugging Face model_type a run exports as: bert | roberta | gpt2 | llama | qwen2 | qwen3.

    Raises:
        ConfigError: a feature of the run with no counterpart (one sentence naming it).
    """
    arch = cfg.model.arch
    if arch == "encoder":
        return encoder_family(cfg, pad_id)
    if arch == "decoder":
        return decoder_family(cfg)
    raise Unmappable(f"model={arch} has no counterpart among the exported families (BERT, RoBERTa, GPT-2, Llama, "
                     f"Qwen2, Qwen3; T5 is not one), so this run cannot be exported as a Hugging Face model")


def hf_config(cfg: DictConfig, family: str, vocab_size: int, ids: dict[str, int]) -> dict:
    """The config.json of `family` for run config `cfg` with `vocab_size` tokens.

    `ids`: the tokenizer's pad/bos/eos ids. The dict holds what transformers and this trainer's
    importer (`families.family_settings`) read back as the run's architecture.
    """
    m, eps = cfg.model, float(cfg.norm.eps)
    common = {"vocab_size": vocab_size, "pad_token_id": ids["pad"], "bos_token_id": ids["bos"],
              "eos_token_id": ids["eos"], "tie_word_embeddings": bool(m.tie_embeddings), "dtype": "float32",
              "initializer_range": 0.02}
    if family in ("bert", "roberta"):
        return {"architectures": ["BertModel" if family == "bert" else "RobertaModel"], "model_type": family,
                **common, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
                "num_attention_heads": m.num_heads, "intermediate_size": m.d_ff,
                "hidden_act": HF_ACTIVATIONS[m.activation], "hidden_dropout_prob": m.dropout,
                "attention_probs_dropout_prob": m.attn_dropout, "max_position_embeddings": table_rows(cfg),
                "type_vocab_size": max(1, int(m.token_types)), "layer_norm_eps": eps,
                "position_embedding_type": "absolute", "is_decoder": False}
    if family == "gpt2":
        rows = table_rows(cfg)
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common, "n_embd": m.d_model,
                "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.d_ff,
                "activation_function": HF_ACTIVATIONS[m.activation], "n_positions": rows, "n_ctx": rows,
                "layer_norm_epsilon": eps, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
                "attn_pdrop": m.attn_dropout, "scale_attn_weights": True}
    theta = float(cfg.position.rope_base)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    out = {"architectures": [arch], "model_type": family, **common, "hidden_size": m.d_model,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.num_kv_heads or m.num_heads, "head_dim": _head_dim(m),
           "intermediate_size": m.d_ff, "hidden_act": "silu", "max_position_embeddings": int(cfg.data.seq_len),
           "rms_norm_eps": eps, "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "attention_dropout": m.attn_dropout}
    if family == "llama":
        out |= {"attention_bias": bool(m.bias), "mlp_bias": bool(m.bias)}
    elif family == "qwen2":
        out |= {"use_sliding_window": False, "sliding_window": None}
    else:
        out |= {"attention_bias": bool(m.bias or m.qkv_bias), "use_sliding_window": False, "sliding_window": None}
    return out
