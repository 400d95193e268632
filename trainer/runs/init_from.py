"""`model.init_from=<run dir>`: start a run from another run's weights (e.g. MLM, then contrastive),
a weights file, or a Hugging Face / sentence-transformers folder (`trainer.pretrained`)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from trainer.errors import ConfigError
from trainer.runs.checkpoints import safe_load
from trainer.runs.run_files import read_run
from trainer.pretrained import VOCAB_KEYS, apply_pretrained_config, fit_vocab_rows, is_model_folder, pretrained_weights
from models.build import build_model
from trainer.data.tokenizer import ByteTokenizer, model_vocab_size

OPTIONAL = {"logit_scale"}  # a parameter the source may lack (a contrastive run's learned temperature)

def _read(source: str) -> dict[str, torch.Tensor]:
    path = os.path.abspath(os.path.expanduser(source))
    if is_model_folder(path):
        return pretrained_weights(path)
    if os.path.isdir(path):
        return read_run(path)[0]
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ConfigError(f"model.init_from={source}: the weights file could not be read ({type(e).__name__}).") from e
    if os.path.isfile(path):
        weights = safe_load(path, what="weights file")
        return weights.get("model", weights)
    raise ConfigError(f"model.init_from={source}: no such run dir or weights file.")

def _check(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str,
           pretrained: bool = False) -> None:
    """Refuse weights that do not fit; a pretrained folder's vocabulary tables may differ in rows."""
    missing = [k for k in own if k not in weights and k not in OPTIONAL]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in weights and weights[k].shape != v.shape
             and not (pretrained and k in VOCAB_KEYS and weights[k].shape[1:] == v.shape[1:])]
    if missing or wrong:
        what = f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else f"shapes differ ({wrong[0]})"
        raise ConfigError(f"model.init_from={source}: its weights do not fit this model: {what}; it must be a run "
                          f"of the same model.arch and sizes (d_model, num_layers, heads, d_ff, position, norm).")

def check_init_from(cfg, overrides: list[str] | None = None) -> None:
    """Refuse, before any work, a `model.init_from` whose weights do not fit `cfg`'s model (the model
    is built on the meta device: shapes only, no memory, no RNG). A pretrained folder's settings
    are applied first (`apply_pretrained_config`, with `overrides`: the command line's), so a
    contradicting override, an unsupported family or pickle-only weights are refused here too."""
    if not cfg.model.init_from:
        return

    cfg = apply_pretrained_config(cfg, overrides)
    weights = _read(cfg.model.init_from)
    embed = weights.get("embed.weight")
    vocab = int(embed.shape[0]) if embed is not None else model_vocab_size(ByteTokenizer())
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=vocab,
                            max_len=cfg.data.seq_len)
    _check(model.state_dict(), weights, cfg.model.init_from, is_model_folder(cfg.model.init_from))

def apply_init_from(model: nn.Module, source: str | None) -> nn.Module:
    """Copy the weights of the finished run (or weights file) `source` into `model`, returned as is.

    Every tensor of `model` must be found with the same shape, except parameters the source run
    did not have (a learned contrastive `logit_scale`), which keep their initial values; the
    source's own extras (e.g. an untied LM head) are ignored. Shapes that differ mean a different
    architecture, which is refused. A pretrained folder (its settings already applied to the
    run's config by `trainer.pretrained.apply_pretrained_config`) is read from safetensors and
    renamed; its embedding rows are fitted to the model's vocabulary (`fit_vocab_rows`).

    Raises:
        ConfigError: `source` is missing, unreadable, or its weights do not fit (one sentence).
    """
    if not source:
        return model
    weights = _read(source)
    own = model.state_dict()
    pretrained = is_model_folder(os.path.abspath(os.path.expanduser(source)))
    _check(own, weights, source, pretrained)
    with torch.no_grad():
        for k, v in own.items():
            if k in weights:
                v.copy_(fit_vocab_rows(v, weights[k]) if pretrained and k in VOCAB_KEYS else weights[k])
    return model
