"""`model.init_from=<run dir>`: start a run from another run's weights (e.g. MLM, then contrastive)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from trainer.errors import ConfigError

OPTIONAL = {"logit_scale"}  # a parameter the source may lack (a contrastive run's learned temperature)


def _read(source: str) -> dict[str, torch.Tensor]:
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        from trainer.runs.artifacts import read_run

        return read_run(path)[0]
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ConfigError(f"model.init_from={source}: the weights file could not be read ({type(e).__name__}).") from e
    if os.path.isfile(path):
        from trainer.runs.checkpoints import safe_load

        weights = safe_load(path, what="weights file")
        return weights.get("model", weights)
    raise ConfigError(f"model.init_from={source}: no such run dir or weights file.")


def _check(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str) -> None:
    missing = [k for k in own if k not in weights and k not in OPTIONAL]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or wrong:
        what = f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else f"shapes differ ({wrong[0]})"
        raise ConfigError(f"model.init_from={source}: its weights do not fit this model: {what}; it must be a run "
                          f"of the same model.arch and sizes (d_model, num_layers, heads, d_ff, position, norm).")


def check_init_from(cfg) -> None:
    """Refuse, before any work, a `model.init_from` whose weights do not fit `cfg`'s model (the model
    is built on the meta device: shapes only, no memory, no RNG)."""
    if not cfg.model.init_from:
        return
    from models.build import build_model
    from trainer.data.tokenizer import ByteTokenizer, model_vocab_size

    weights = _read(cfg.model.init_from)
    embed = weights.get("embed.weight")
    vocab = int(embed.shape[0]) if embed is not None else model_vocab_size(ByteTokenizer())
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=vocab,
                            max_len=cfg.data.seq_len)
    _check(model.state_dict(), weights, cfg.model.init_from)


def apply_init_from(model: nn.Module, source: str | None) -> nn.Module:
    """Copy the weights of the finished run (or weights file) `source` into `model`, returned as is.

    Every tensor of `model` must be found with the same shape, except parameters the source run
    did not have (a learned contrastive `logit_scale`), which keep their initial values; the
    source's own extras (e.g. an untied LM head) are ignored. Shapes that differ mean a different
    architecture, which is refused.

    Raises:
        ConfigError: `source` is missing, unreadable, or its weights do not fit (one sentence).
    """
    if not source:
        return model
    weights = _read(source)
    own = model.state_dict()
    _check(own, weights, source)
    with torch.no_grad():
        for k, v in own.items():
            if k in weights:
                v.copy_(weights[k])
    return model
