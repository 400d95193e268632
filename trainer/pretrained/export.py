"""A model of this trainer out as a Hugging Face (and, for an encoder, sentence-transformers) folder.

    python -m trainer.export run_dir=<run> output=<dir>

The folder holds config.json (`export_config.hf_config`), model.safetensors, the tokenizer
(`tokenizer_files`) and, for an encoder, sentence-transformers' modules.json,
sentence_bert_config.json (max_seq_length), 1_Pooling/config.json (the run's objective.pooling)
and 2_Normalize (the trainer's embeddings are unit vectors): `transformers.AutoModel` /
`AutoModelForCausalLM` and `sentence_transformers.SentenceTransformer` load it with no code of
ours, and `model.init_from=<dir>` reads it back. export.json records where it came from.

The weights are the import's per-family maps (`weight_maps.MAPS`) run backwards: each family's map
is traced once with symbolic Hugging Face tensors, giving for every state_dict entry the Hugging
Face tensor(s) it is made of (a name, a transposed name for GPT-2's Conv1D, or names
concatenated along the output dimension for a fused projection, split here as the model fuses
them), so both directions read one table per family. The vocabulary is the tokenizer's: rows
beyond it (the model's padding to a multiple of 64) are dropped; a decoder's logits over ids the
run marked unpredictable (model.num_tokens) are -inf here but finite in transformers.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.nn as nn
from omegaconf import DictConfig

from trainer.errors import ConfigError
from trainer.pretrained.export_config import export_family, hf_config, max_input_length, table_rows
from trainer.pretrained.tokenizer_files import write_tokenizer_files
from trainer.pretrained.weight_maps import MAPS
from models.position import sinusoidal_table

MARKER = "export.json"  # written last into every export: an output holding it may be replaced
PREFIX = {"bert": "", "roberta": "", "gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "qwen3": "model."}
ALWAYS_BIASED = ("bert", "roberta", "gpt2")  # every linear layer of these families has a bias
NOT_EXPORTED = ("logit_scale",)  # a contrastive run's learned temperature: training state only

class _Ref:
    """A symbolic Hugging Face tensor while a weight map is traced: its name, maybe transposed."""

    def __init__(self, name: str, transposed: bool = False):
        self.name, self.transposed = name, transposed

    def t(self) -> "_Ref":
        return _Ref(self.name, not self.transposed)

class _Trace:
    """Stands in for `weight_maps._Tensors`: every name exists and is returned as a `_Ref`."""

    head = None

    def __call__(self, name: str) -> _Ref:
        return _Ref(name)

    def has(self, name: str) -> bool:
        return True  # entries the model lacks are dropped after tracing

    def cat(self, *names: str) -> tuple[_Ref, ...]:
        return tuple(_Ref(n) for n in names)

def _position_table(stack: nn.Module, kind: str, rows: int, d_model: int) -> torch.Tensor:
    """(rows, D): what the stack's absolute position scheme `kind` adds at positions 0..rows-1."""

    if kind == "sinusoidal":
        return sinusoidal_table(rows, d_model) * stack.position.scale
    return torch.zeros(rows, d_model)  # position=none: nothing is added

def complete_state(model: nn.Module, cfg: DictConfig, family: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """The model's state_dict on the CPU with the vocabulary cut to `vocab_size` rows and the
    tensors `family` has but the run lacks filled in exactly: zero biases, BERT's zero token-type
    row, the table of a sinusoidal or absent position scheme."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in NOT_EXPORTED}
    for key in ("embed.weight", "head.weight"):
        if key in state:
            state[key] = state[key][:vocab_size]
    stack_name = "encoder" if cfg.model.arch == "encoder" else "decoder"
    stack = getattr(model, stack_name)
    if family in ("bert", "roberta", "gpt2") and f"{stack_name}.position.emb.weight" not in state:
        state[f"{stack_name}.position.emb.weight"] = _position_table(stack, cfg.position.kind, table_rows(cfg),
                                                                     cfg.model.d_model)
    if family in ("bert", "roberta") and "embed_types.weight" not in state:
        state["embed_types.weight"] = torch.zeros(1, cfg.model.d_model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".blocks." not in name or f"{name}.bias" in state:
            continue  # the biases in question are the blocks' (an untied LM head has none in any family)
        if family in ALWAYS_BIASED or (family == "qwen3" and name.endswith("self_attn.out")
                                       and f"{name[:-3]}qkv.bias" in state):
            state[f"{name}.bias"] = torch.zeros(module.out_features)
    return state

def _split(key: str, tensor: torch.Tensor, parts: int, cfg: DictConfig) -> list[torch.Tensor]:
    """A fused projection's rows, split as the model fuses them: [q; k; v] or [gate; value]."""
    m = cfg.model
    if parts == 3:  # self_attn.qkv: num_heads query heads, then num_kv_heads key and value heads
        dh = m.head_dim or m.d_model // m.num_heads
        kv = (m.num_kv_heads or m.num_heads) * dh
        sizes = [m.num_heads * dh, kv, kv]
    else:  # ffn.up of SwiGLU: gate rows, then value rows
        sizes = [tensor.shape[0] // parts] * parts
    assert sum(sizes) == tensor.shape[0], f"{key}: rows {tensor.shape[0]} are not {sizes}"
    return list(torch.split(tensor, sizes, dim=0))

def export_weights(state: dict[str, torch.Tensor], cfg: DictConfig, family: str, hf: dict) -> dict[str, torch.Tensor]:
    """`state` (the trainer's names) -> Hugging Face tensor names and layouts for `family`, through
    the import's weight map traced backwards (see the module docstring).

    Raises:
        ConfigError: a tensor of the run that the family's map has no place for (named).
    """
    traced = MAPS[family](_Trace(), hf)
    out: dict[str, torch.Tensor] = {}
    for key, refs in traced.items():
        if key not in state:
            continue  # an optional tensor of the family (a bias, q/k norms) that this run does not have
        pieces = _split(key, state[key], len(refs), cfg) if isinstance(refs, tuple) else [state[key]]
        for ref, piece in zip(refs if isinstance(refs, tuple) else (refs,), pieces):
            out[PREFIX[family] + ref.name] = (piece.t() if ref.transposed else piece).clone().contiguous()
    if "head.weight" in state:  # an untied LM head
        out["lm_head.weight"] = state["head.weight"].clone().contiguous()
    left = sorted(set(state) - set(traced) - {"head.weight"})
    if left:
        raise ConfigError(f"the run's tensor {left[0]} has no place in a {family} checkpoint, so it cannot be "
                          f"exported as a Hugging Face model")
    return out

def sentence_transformers_files(folder: str, cfg: DictConfig) -> None:
    """modules.json (Transformer -> Pooling -> Normalize), sentence_bert_config.json, 1_Pooling and 2_Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    pooling = cfg.objective.pooling
    pool = {"word_embedding_dimension": int(cfg.model.d_model), "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False, "include_prompt": True}
    os.makedirs(os.path.join(folder, "1_Pooling"))
    os.makedirs(os.path.join(folder, "2_Normalize"))
    for name, content in (("modules.json", modules), ("1_Pooling/config.json", pool),
                          ("sentence_bert_config.json", {"max_seq_length": max_input_length(cfg),
                                                         "do_lower_case": False}),
                          ("config_sentence_transformers.json", {"similarity_fn_name": "cosine", "prompts": {},
                                                                 "default_prompt_name": None})):
        _write_json(os.path.join(folder, name), content)

def _write_json(path: str, content) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)

def check_output(output: str) -> None:
    """Refuse an `output` that exists and is neither an empty folder nor a previous export.

    Raises:
        ConfigError: a file, or a non-empty folder without export.json (nothing is written).
    """
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise ConfigError(f"output={output} is a file; pass a new or empty folder (or a previous export).")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, MARKER)):
        raise ConfigError(f"output={output} is a non-empty folder that is not a previous export (no {MARKER}); "
                          f"pass a new or empty folder, nothing was written.")

def export_model(model: nn.Module, tokenizer, cfg: DictConfig, output: str, source: str = "") -> dict:
    """Write `model` (with its `tokenizer` and run config `cfg`) as a Hugging Face folder `output`,
    atomically: built in a temporary sibling folder, then renamed into place (a previous export
    there is replaced only once the new one is complete). Returns what export.json records.

    Raises:
        ConfigError: a feature with no Hugging Face counterpart, or an output that may not be
            written (see `check_output`); raised before anything is written.
    """
    from safetensors.torch import save_file

    output = os.path.abspath(output)
    check_output(output)
    family = export_family(cfg, tokenizer.pad_id)
    vocab = int(tokenizer.vocab_size)
    hf = hf_config(cfg, family, vocab, {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id})
    weights = export_weights(complete_state(model, cfg, family, vocab), cfg, family, hf)
    encoder = cfg.model.arch == "encoder"
    info = {"source": source, "family": family, "tensors": len(weights),
            "parameters": sum(t.numel() for t in weights.values()), "vocab_size": vocab,
            "max_seq_length": max_input_length(cfg), "pooling": cfg.objective.pooling if encoder else None,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = f"{output}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_json(os.path.join(tmp, "config.json"), hf)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tokenizer, tmp, encoder, max_input_length(cfg))
        if encoder:
            sentence_transformers_files(tmp, cfg)
        _write_json(os.path.join(tmp, MARKER), info)
        _swap_in(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info

def _swap_in(tmp: str, output: str) -> None:
    """Rename the finished `tmp` to `output`; an empty or previously exported `output` is set aside
    first and removed only after the rename succeeded."""
    old = None
    if os.path.exists(output):
        old = f"{output}.old{os.getpid()}"
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        if old is not None:
            os.replace(old, output)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
