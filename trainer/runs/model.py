"""The one model builder every path uses: a run's config (and vocabulary) -> its model."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.build import build_model
from trainer.data.tokenizer import VOCAB_SIZE
from trainer.errors import ConfigError
from trainer.objectives import resolve_objective
from trainer.objectives.contrastive import apply_learned_temperature


def build_run_model(cfg, vocab_size: int, max_len: int | None = None, num_tokens: int | None = None) -> nn.Module:
    """The untrained model of run config `cfg`, on the CPU in fp32.

    `build_model` from the model/attention/position/norm groups, plus the learned temperature
    (`logit_scale`) of a contrastive run with `objective.learn_temperature`, so its state_dict
    matches the run's checkpoints. `max_len`: the learned-position table (default data.seq_len).
    `num_tokens`: the tokenizer's real vocabulary (`tokenizer.vocab_size`); the head gives the
    padding rows above it (up to `vocab_size`, a multiple of 64) a logit of -inf. None: no mask.
    """
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=vocab_size,
                        max_len=max_len or cfg.data.seq_len, num_tokens=num_tokens)
    objective = resolve_objective(cfg.model.arch, cfg.objective.kind)
    if objective == "contrastive" and cfg.objective.get("learn_temperature", False):
        apply_learned_temperature(model, cfg.objective.temperature)
    return model


def weights_vocab(weights: dict[str, torch.Tensor]) -> int:
    """Embedding rows of a state_dict (the tokenizer's vocabulary, rounded as the run built it)."""
    embed = weights.get("embed.weight")
    return int(embed.shape[0]) if embed is not None else VOCAB_SIZE


def model_with_weights(cfg, weights: dict[str, torch.Tensor], where: str = "",
                       vocab_size: int | None = None, num_tokens: int | None = None) -> nn.Module:
    """An unquantized model for run config `cfg` holding `weights`, in eval mode (global RNG untouched).

    `vocab_size`: the embedding rows (None: the rows of `embed.weight`, else the byte vocabulary).
    `num_tokens`: the tokenizer's real vocabulary (rows above it get -inf logits; None: no mask).
    Raises ConfigError naming `where` when the weights do not fit the config's model.
    """
    with torch.random.fork_rng(devices=[]):
        model = build_run_model(cfg, vocab_size or weights_vocab(weights), num_tokens=num_tokens)
    try:
        if "logit_scale" in weights:  # a contrastive run's learned temperature (it scales the loss)
            apply_learned_temperature(model, cfg.objective.temperature)
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"the weights{' in ' + where if where else ''} do not fit the run's model "
                          f"({str(e).splitlines()[0][:160]}).") from e
    return model.eval()
