"""Training objectives: clm, mlm, span (language modelling) and contrastive (retrieval).

`build_objective` is the one place an objective is chosen; the loop only calls the
`trainer.objectives.base.Objective` interface.
"""
from __future__ import annotations

from trainer.data.tokenizer import PAD
from trainer.errors import ConfigError
from trainer.objectives.base import Batch, Objective, split_rows, to_device
from trainer.objectives.clm import CausalLM
from trainer.objectives.contrastive import Contrastive
from trainer.objectives.mlm import MaskedLM
from trainer.objectives.span import SpanCorruption, span_lengths

OBJECTIVES = ("auto", "clm", "mlm", "span", "contrastive")  # objective=<kind>
# objective=auto picks the objective each architecture is trained with by default.
AUTO_OBJECTIVE = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}
OBJECTIVE_ARCHS = {"clm": ("decoder",), "mlm": ("encoder",), "span": ("encoder_decoder",),
                   "contrastive": ("encoder",)}


def resolve_objective(model_arch: str, objective: str) -> str:
    """The objective a run trains with (`auto` picks the architecture's default)."""
    return AUTO_OBJECTIVE[model_arch] if objective == "auto" else objective


def build_objective(kind: str, cfg, tokenizer=None) -> Objective:
    """Build the objective named `kind` (already resolved from `auto`) from `cfg.objective`.

    Its special ids (MASK, sentinels, BOS/EOS, PAD) and bytes per id come from `tokenizer`
    (None: the byte tokenizer). `cfg.z_loss` sets the language-model objectives' z-loss
    coefficient. Raises ConfigError for an unknown kind.
    """
    if kind == "clm":
        objective: Objective = CausalLM(tokenizer)
    elif kind == "mlm":
        objective = MaskedLM(cfg.mask_prob, tokenizer)
    elif kind == "span":
        objective = SpanCorruption(cfg.noise_density, cfg.mean_span, tokenizer)
    elif kind == "contrastive":
        return Contrastive(cfg.temperature, cfg.pooling, PAD if tokenizer is None else tokenizer.pad_id)
    else:
        raise ConfigError(f"objective={kind!r} is not valid; choose one of: {', '.join(OBJECTIVES)}.")
    objective.z_loss = float(getattr(cfg, "z_loss", 0.0) or 0.0)  # PaLM z-loss on the training loss
    return objective


__all__ = ["Batch", "Objective", "CausalLM", "MaskedLM", "SpanCorruption", "Contrastive", "OBJECTIVES",
           "build_objective", "resolve_objective", "span_lengths", "split_rows", "to_device"]
