"""A pretrained folder as a ready model: `load_pretrained_model(folder) -> (model, tokenizer, cfg)`,
the counterpart of `trainer.runs.artifacts.load_model` for a Hugging Face or sentence-transformers
folder (or a packaged model's name), for the tools and tests that use a model without training it."""
from __future__ import annotations

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from trainer.config.schema import Config
from trainer.data.tokenizer import HFTokenizer, load_pretrained, model_vocab_size
from trainer.errors import ConfigError
from trainer.pretrained import apply_pretrained_config
from trainer.runs.init_from import apply_init_from
from trainer.runs.model import build_run_model


def pretrained_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The schema's default config with `overrides` (dotted `key=value`, e.g. `attention.kind=tiled`)
    and then `model.init_from=source`'s settings applied (`apply_pretrained_config`); data.seq_len
    is lowered to the longest input the folder supports (sentence-transformers' max_seq_length).

    Raises:
        ConfigError: `source` is not a supported pretrained folder or packaged name; bad overrides.
    """
    cfg = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"the overrides {list(overrides)} do not fit the config schema "
                          f"({str(e).splitlines()[0]}).") from e
    with open_dict(cfg):
        cfg.model.init_from = str(source)
    out = apply_pretrained_config(cfg, list(overrides), fit_length=True)
    if out is cfg:
        raise ConfigError(f"{source} is not a Hugging Face or sentence-transformers folder (config.json or "
                          f"modules.json) nor a packaged model name.")
    return out


def load_pretrained_model(source: str, device: str | torch.device = "cpu",
                          overrides: list[str] | tuple[str, ...] = ()) -> tuple[nn.Module, HFTokenizer, DictConfig]:
    """`(model, tokenizer, config)` of a pretrained folder: the folder's architecture with its
    weights, in eval mode on `device`; its tokenizer.json (with the special tokens the objectives
    need added); the resolved config (objective.pooling from a sentence-transformers folder).
    The global RNG is left untouched (rows the checkpoint lacks are initialized from a fork).

    Raises:
        ConfigError: as `pretrained_config`, or unreadable / unfitting weights.
    """
    cfg = pretrained_config(source, overrides)
    tokenizer = load_pretrained(cfg.tokenizer.path, say=lambda _msg: None)
    with torch.random.fork_rng(devices=[]):
        model = build_run_model(cfg, model_vocab_size(tokenizer), num_tokens=tokenizer.vocab_size)
    apply_init_from(model, cfg.model.init_from)
    return model.eval().to(device), tokenizer, cfg
