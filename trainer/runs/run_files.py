"""A run's files: its final weights (model.safetensors with the config in the header, or older
runs' model.pt / newest checkpoint) and its resolved config.

Nothing read here executes code: weights come from safetensors or `torch.load(weights_only=True)`
(DCP checkpoints through an allow-list); the config is JSON (the safetensors header) or YAML.
"""
from __future__ import annotations

import json
import os

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.runs.checkpoints import checkpoint_weights, list_checkpoints, safe_load

WEIGHTS = "model.safetensors"


def save_weights(weights: dict[str, torch.Tensor], path: str, config: dict) -> None:
    """Write a state_dict as safetensors (contiguous CPU tensors), with the resolved run config
    as JSON in the header (`config`), atomically (temporary name, then rename).

    Tied weights are stored once: the state_dict holds `embed.weight` only (the head reuses it).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "trainer", "config": json.dumps(config)})
    os.replace(tmp, path)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not a safetensors file, bad header ...
        raise ConfigError(f"weights file {path} could not be loaded: it is corrupt or unreadable "
                          f"({type(e).__name__}); it was left as is.") from e
    config = json.loads(meta["config"]) or None if "config" in meta else None
    return weights, config


def _newest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    return found[-1] if found else None


def read_run(run_dir: str) -> tuple[dict[str, torch.Tensor], DictConfig]:
    """The final weights and the resolved config of `run_dir` (checked against the schema).

    Raises:
        ConfigError: no such directory, no weights, or no config in it (one sentence).
    """
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir} is not a directory; pass the run dir of a finished training run "
                          f"(e.g. outputs/<date>/<time>).")
    weights = config = None
    st, pt, ck = os.path.join(run_dir, WEIGHTS), os.path.join(run_dir, "model.pt"), _newest_checkpoint(run_dir)
    if os.path.isfile(st):
        weights, config = _read_safetensors(st)
    elif os.path.isfile(pt):
        weights = safe_load(pt, what="weights file")
    elif ck is not None:  # a run stopped before its final weights: its newest checkpoint (.pt or .dcp)
        weights, config = checkpoint_weights(ck)
    else:
        raise ConfigError(f"run_dir={run_dir} holds no weights ({WEIGHTS}, model.pt or checkpoints/step_*.pt); "
                          f"train it first or pass another run dir.")
    hydra_cfg = os.path.join(run_dir, ".hydra", "config.yaml")
    if config is None and os.path.isfile(hydra_cfg):
        config = OmegaConf.load(hydra_cfg)  # YAML through OmegaConf's safe loader
    if config is None:
        raise ConfigError(f"run_dir={run_dir} has weights but no config (.hydra/config.yaml, the {WEIGHTS} "
                          f"header or a checkpoint); it cannot be rebuilt.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), config)
    except Exception as e:
        raise ConfigError(f"the config of run_dir={run_dir} does not fit this trainer's schema "
                          f"({str(e).splitlines()[0]}).") from e
    return weights, cfg  # type: ignore[return-value]
