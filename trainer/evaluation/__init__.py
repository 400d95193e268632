"""Evaluation behind one interface: every evaluator scores the model on held-out data.

`HeldOutLoss` (loss, accuracy, perplexity, bits per byte on the fixed held-out sample) runs for
every objective; `RetrievalSearch` (recall@k, MRR@10, nDCG@10 of a held-out search, and the BM25
baseline on the same search) is added for contrastive runs. The loop, `trainer.evaluate` and the
quantization report call `evaluate_all` and never branch on the objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

from trainer.distributed import Dist


@dataclass
class EvalContext:
    """Where and how an evaluation runs."""

    device: torch.device
    precision: str = "fp32"
    dist: Dist = field(default_factory=Dist)
    batch_size: int = 16  # rows per forward (the run's global batch size)
    stop_signal: Callable[[], int] = lambda: 0  # nonzero: a signal asked the run to stop


class Evaluator(Protocol):
    """Scores a model; `evaluate` returns `eval/...` metrics, or None when a stop signal arrived."""

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float] | None: ...

    def baseline(self) -> dict[str, float]:
        """Reference numbers that do not depend on the model (logged once per run), e.g. BM25."""
        ...

    def describe_baseline(self, metrics: dict[str, float]) -> str:
        """The line a run prints with `baseline()`'s numbers."""
        ...


def evaluate_all(evaluators: list, model: nn.Module, ctx: EvalContext) -> dict[str, float] | None:
    """The union of every evaluator's metrics (None if any was stopped by a signal).

    The model is put in eval mode for the duration and restored to its previous mode.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for ev in evaluators:
            metrics = ev.evaluate(model, ctx)
            if metrics is None:
                return None
            out.update(metrics)
    finally:
        model.train(was_training)
    return out
