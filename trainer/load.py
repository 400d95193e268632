"""load_model(run_dir) -> (model, tokenizer, config): the one reader of a finished run.

Nothing read here executes code: weights come from `model.safetensors` (safetensors) or, for
older runs, `model.pt` / the newest checkpoint through `torch.load(weights_only=True)`; the
config is JSON (the safetensors header) or YAML (`.hydra/config.yaml`).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from trainer.config import Config, ConfigError
from trainer.tokenizer import ByteTokenizer

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
    from trainer.checkpoint import list_checkpoints

    found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    return found[-1] if found else None


def read_run(run_dir: str) -> tuple[dict[str, torch.Tensor], DictConfig]:
    """The final weights and the resolved config of `run_dir` (checked against the schema).

    Raises:
        ConfigError: no such directory, no weights, or no config in it (one sentence).
    """
    from trainer.checkpoint import safe_load

    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir} is not a directory; pass the run dir of a finished training run "
                          f"(e.g. outputs/<date>/<time>).")
    weights = config = None
    st, pt, ck = os.path.join(run_dir, WEIGHTS), os.path.join(run_dir, "model.pt"), _newest_checkpoint(run_dir)
    if os.path.isfile(st):
        weights, config = _read_safetensors(st)
    elif os.path.isfile(pt):
        weights = safe_load(pt, what="weights file")
    elif ck is not None:
        weights = safe_load(ck, what="checkpoint")["model"]
    else:
        raise ConfigError(f"run_dir={run_dir} holds no weights ({WEIGHTS}, model.pt or checkpoints/step_*.pt); "
                          f"train it first or pass another run dir.")
    hydra_cfg = os.path.join(run_dir, ".hydra", "config.yaml")
    if config is None and os.path.isfile(hydra_cfg):
        config = OmegaConf.load(hydra_cfg)  # YAML through OmegaConf's safe loader
    if config is None and ck is not None:
        config = safe_load(ck, what="checkpoint").get("meta", {}).get("config")
    if config is None:
        raise ConfigError(f"run_dir={run_dir} has weights but no config (.hydra/config.yaml, the {WEIGHTS} "
                          f"header or a checkpoint); it cannot be rebuilt.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), config)
    except Exception as e:
        raise ConfigError(f"the config of run_dir={run_dir} does not fit this trainer's schema "
                          f"({str(e).splitlines()[0]}).") from e
    return weights, cfg  # type: ignore[return-value]


def build_run_model(cfg: DictConfig, weights: dict[str, torch.Tensor], where: str = "") -> nn.Module:
    """An unquantized model for root config `cfg` holding `weights`, in eval mode (global RNG untouched)."""
    from models.build import build_model
    from trainer.data import VOCAB_SIZE

    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                            max_len=cfg.data.seq_len)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"the weights{' in ' + where if where else ''} do not fit the run's model "
                          f"({str(e).splitlines()[0][:160]}).") from e
    return model.eval()


def load_model(run_dir: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ByteTokenizer, DictConfig]:
    """Load a finished run: `(model, tokenizer, config)`.

    The model is the run's architecture with its final weights, in eval mode on `device`; the
    tokenizer encodes/decodes text to the model's ids; the config is the run's resolved config.

    Raises:
        ConfigError: missing run dir, no weights or config, corrupt or mismatched files.
    """
    run_dir = os.path.abspath(os.path.expanduser(str(run_dir)))
    weights, cfg = read_run(run_dir)
    model = build_run_model(cfg, weights, run_dir)
    return model.to(device), ByteTokenizer(), cfg
