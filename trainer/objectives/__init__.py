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
    (None: the byte tokenizer). Raises ConfigError for an unknown kind.
    """
    if kind == "clm":
        return CausalLM(tokenizer)
    if kind == "mlm":
        return MaskedLM(cfg.mask_prob, tokenizer)
    if kind == "span":
        return SpanCorruption(cfg.noise_density, cfg.mean_span, tokenizer)
    if kind == "contrastive":
        return Contrastive(cfg.temperature, cfg.pooling, PAD if tokenizer is None else tokenizer.pad_id)
    raise ConfigError(f"objective={kind!r} is not valid; choose one of: {', '.join(OBJECTIVES)}.")


__all__ = ["Batch", "Objective", "CausalLM", "MaskedLM", "SpanCorruption", "Contrastive", "OBJECTIVES",
           "build_objective", "resolve_objective", "span_lengths", "split_rows", "to_device"]
