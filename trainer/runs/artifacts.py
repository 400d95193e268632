"""load_model(run_dir) -> (model, tokenizer, config): the one loader of a finished run (or a
pretrained model folder) for every tool.

Nothing read here executes code: weights come from `model.safetensors` (safetensors) or, for
older runs, `model.pt` / the newest checkpoint through `torch.load(weights_only=True)`; the
config is JSON (the safetensors header) or YAML (`.hydra/config.yaml`).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from omegaconf import DictConfig

from trainer.errors import ConfigError
from trainer.pretrained import pretrained_folder
from trainer.pretrained.load import load_pretrained_model
from trainer.runs.model import model_with_weights
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer_json, model_vocab_size

from trainer.runs.run_files import WEIGHTS, read_run, save_weights  # noqa: F401 (the run's files)


def load_tokenizer(run_dir: str, cfg: DictConfig) -> ByteTokenizer | HFTokenizer:
    """The run's tokenizer: its `tokenizer.json` (bpe/pretrained runs), else the byte tokenizer.

    Raises:
        ConfigError: a bpe/pretrained run whose tokenizer.json is missing or unreadable.
    """
    kind = cfg.tokenizer.kind if "tokenizer" in cfg else "byte"
    if kind == "byte":
        return ByteTokenizer()
    path = os.path.join(run_dir, "tokenizer.json")
    try:
        return load_tokenizer_json(path, kind)
    except Exception as e:
        raise ConfigError(f"run_dir={run_dir} was trained with tokenizer={kind} but its tokenizer.json is "
                          f"missing or unreadable ({type(e).__name__}); it cannot encode text.") from e


def load_model(run_dir: str, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, ByteTokenizer | HFTokenizer, DictConfig]:
    """Load a finished run: `(model, tokenizer, config)`.

    The model is the run's architecture with its final weights, in eval mode on `device`; the
    tokenizer (ByteTokenizer, or the run's BPE/pretrained `tokenizer.json`) encodes/decodes text
    to the model's ids; the config is the run's resolved config.

    Raises:
        ConfigError: missing run dir, no weights or config, corrupt or mismatched files.
    """
    if pretrained_folder(str(run_dir), os.environ.get("TRAINER_CACHE", "~/.cache/trainer")) is not None:
        return load_pretrained_model(str(run_dir), device)
    run_dir = os.path.abspath(os.path.expanduser(str(run_dir)))
    weights, cfg = read_run(run_dir)
    tokenizer = load_tokenizer(run_dir, cfg)
    model = model_with_weights(cfg, weights, run_dir, vocab_size=model_vocab_size(tokenizer),
                               num_tokens=tokenizer.vocab_size)
    return model.to(device), tokenizer, cfg
