"""Reading a Hugging Face model folder or a sentence-transformers folder, without running its code.

A Hugging Face folder holds `config.json` (the architecture, read as JSON) and its weights as
`model.safetensors` or shards listed in `model.safetensors.index.json` (read with `safetensors`).
Pickle weights (`pytorch_model.bin`, `*.pt`) are never unpickled: a folder holding only those is
refused. A sentence-transformers folder adds `modules.json` (the module pipeline: a Transformer,
a Pooling module with `<path>/config.json`, optionally Normalize) and `sentence_bert_config.json`
(`max_seq_length`); its Transformer module's folder (often the folder itself) is the Hugging Face
folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from trainer.errors import ConfigError

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin", "tf_model.h5")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# Pooling modes of sentence-transformers' Pooling config -> objective.pooling.
ST_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass
class PretrainedFolder:
    """A pretrained model folder, read.

    Attributes:
        path: the folder given. model_dir: the folder holding config.json, the weights and the
        tokenizer (the Transformer module's folder of a sentence-transformers folder).
        config: config.json as a dict. pooling: `mean` | `cls` from the Pooling module, or None
        (not a sentence-transformers folder). normalize: whether a Normalize module follows.
        max_seq_length: sentence_bert_config.json's value, or None.
    """

    path: str
    model_dir: str
    config: dict
    pooling: str | None = None
    normalize: bool = False
    max_seq_length: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def is_model_folder(path: str) -> bool:
    """Whether `path` is a Hugging Face or sentence-transformers folder (not a run dir)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path) or os.path.isdir(os.path.join(path, ".hydra")):
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "modules.json"))


def _json(path: str, key: str) -> dict | list:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path} could not be read as JSON ({type(e).__name__}).") from e


def _sentence_transformers(path: str, key: str) -> tuple[str, dict]:
    """(the Transformer module's folder, pooling/normalize/max_seq_length) from modules.json."""
    modules = _json(os.path.join(path, "modules.json"), key)
    found: dict = {"pooling": None, "normalize": False, "max_seq_length": None}
    model_dir = None
    for m in modules if isinstance(modules, list) else []:
        kind, sub = str(m.get("type", "")), os.path.join(path, str(m.get("path", "")))
        if kind == ST_TRANSFORMER:
            model_dir = sub
        elif kind == ST_POOLING:
            pool = _json(os.path.join(sub, "config.json"), key)
            modes = [name for name, on in pool.items() if name.startswith("pooling_mode") and on]
            if len(modes) != 1 or modes[0] not in ST_POOLINGS:
                raise ConfigError(f"{key}={path}: its pooling module uses {', '.join(modes) or 'no mode'}; "
                                  f"only one of {', '.join(ST_POOLINGS)} (mean or cls pooling) is supported.")
            found["pooling"] = ST_POOLINGS[modes[0]]
        elif kind == ST_NORMALIZE:
            found["normalize"] = True
        else:
            raise ConfigError(f"{key}={path}: its modules.json has a {kind or 'nameless'} module; only "
                              f"Transformer, Pooling and Normalize modules are supported.")
    if model_dir is None:
        raise ConfigError(f"{key}={path}: its modules.json names no sentence_transformers.models.Transformer "
                          f"module, so it holds no model to start from.")
    for where in (model_dir, path):
        sb = os.path.join(where, "sentence_bert_config.json")
        if os.path.isfile(sb):
            found["max_seq_length"] = _json(sb, key).get("max_seq_length")
            break
    return model_dir, found


def read_folder(path: str, key: str = "model.init_from") -> PretrainedFolder:
    """Read the config (and sentence-transformers modules) of the folder `path`.

    Raises:
        ConfigError: no config.json, unreadable JSON, only pickle weights, no weights, or a
            sentence-transformers module that is not supported (one sentence naming `key`).
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    st: dict = {}
    model_dir = path
    if os.path.isfile(os.path.join(path, "modules.json")):
        model_dir, st = _sentence_transformers(path, key)
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"{key}={path}: no config.json in {model_dir}; a Hugging Face model folder needs it.")
    config = _json(config_file, key)
    if not isinstance(config, dict):
        raise ConfigError(f"{key}={path}: {config_file} is not a JSON object.")
    weight_files(model_dir, key)  # refuse a folder without safetensors weights now, before any work
    return PretrainedFolder(path=path, model_dir=model_dir, config=config, **st)


def weight_files(model_dir: str, key: str = "model.init_from") -> list[str]:
    """The safetensors files of `model_dir`: model.safetensors, or the shards its index lists.

    Raises:
        ConfigError: only pickle weights (never unpickled: loading them could run code), or none.
    """
    single, index = os.path.join(model_dir, WEIGHTS), os.path.join(model_dir, INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = sorted(set(_json(index, key).get("weight_map", {}).values()))
        files = [os.path.join(model_dir, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise ConfigError(f"{key}={model_dir}: {INDEX} lists shards that are missing "
                              f"({os.path.basename(missing[0]) if missing else 'none listed'}).")
        return files
    pickles = [f for f in os.listdir(model_dir) if f in PICKLES or f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ConfigError(f"{key}={model_dir} holds only pickle weights ({', '.join(sorted(pickles))}), which are "
                          f"never unpickled because loading them can run code; save the model as safetensors "
                          f"(save_pretrained(folder, safe_serialization=True)) and pass that folder.")
    raise ConfigError(f"{key}={model_dir} holds no {WEIGHTS} (nor a sharded {INDEX}); a Hugging Face model "
                      f"folder needs its weights in safetensors.")


def read_weights(model_dir: str, key: str = "model.init_from") -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by its Hugging Face name, on the CPU.

    Raises:
        ConfigError: no safetensors weights, or a file that cannot be read (named; left as is).
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir, key):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # truncated, not safetensors, bad header ...
            raise ConfigError(f"{key}: the weights file {file} could not be read ({type(e).__name__}); it was "
                              f"left as is.") from e
    return out
