"""Held-out loss, token accuracy, perplexity and bits per byte on the fixed held-out sample."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.data.heldout import EVAL_SEED, eval_sample
from trainer.distributed import all_reduce_max, all_reduce_sum
from trainer.evaluation import EvalContext
from trainer.objectives.base import Objective, to_device
from trainer.precision import autocast


class HeldOutLoss:
    """`eval/loss` (mean nats per target), `eval/accuracy`, `eval/perplexity`, `eval/bits_per_byte`.

    The sample (`trainer.data.heldout.eval_sample`) is spread over the whole validation split, and
    its masks come from a private generator with a fixed seed (`EVAL_SEED`): the same blocks and
    masks at every evaluation and in every job, and the training generators are never touched.

    `eval/bits_per_byte` = summed loss (nats) / ln 2 / UTF-8 bytes of the targets' text, where the
    objective defines the targets (`Objective.num_target_bytes`: clm the next tokens, mlm the
    original tokens at the masked positions, span the corrupted spans) and special ids (BOS, EOS,
    PAD, sentinels) count 0 bytes; comparable across tokenizers. Absent when undefined (contrastive).

    Args:
        objective: turns blocks into batches and scores them. val_blocks: (N, L + 1) held-out
            blocks (a tensor or the memory-mapped store). eval_batches: batches in the sample.
    """

    def __init__(self, objective: Objective, val_blocks, eval_batches: int):
        self.objective, self.val_blocks, self.eval_batches = objective, val_blocks, eval_batches

    def baseline(self) -> dict[str, float]:
        return {}

    def describe_baseline(self, metrics: dict[str, float]) -> str:
        return ""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float] | None:
        obj, d = self.objective, ctx.dist
        gen = torch.Generator().manual_seed(EVAL_SEED)
        sums = torch.zeros(5, device=ctx.device)  # loss_sum, correct, targets, blocks, target bytes
        for blocks in eval_sample(self.val_blocks, ctx.batch_size, self.eval_batches):
            if all_reduce_max(torch.tensor([float(ctx.stop_signal())]), d).item():
                return None
            part, counts = obj.eval_rows(obj.prepare(blocks, gen), d.dp_rank, d.dp_size)
            with autocast(ctx.precision, ctx.device):
                ls, c = obj.loss(model, to_device(part, ctx.device))
            if counts and d.counts:  # one rank per model replica
                nbytes = obj.num_target_bytes(part)  # None: bits per byte is undefined
                sums += torch.tensor([float(ls), float(c), float(obj.num_targets(part)),
                                      float(part[obj.rows_key].shape[0]),
                                      float("nan") if nbytes is None else float(nbytes)], device=ctx.device)
        all_reduce_sum(sums, d)
        loss_sum, correct, n, blocks_seen, n_bytes = sums.tolist()
        loss = loss_sum / max(n, 1)
        out = {"eval/loss": loss, "eval/accuracy": correct / max(n, 1), "eval/perplexity": math.exp(min(loss, 50.0)),
               "eval/blocks": blocks_seen, "eval/targets": n}
        if n_bytes == n_bytes and n_bytes > 0:  # summed nats / ln 2 / UTF-8 bytes of the targets' text
            out["eval/bits_per_byte"] = loss_sum / math.log(2) / n_bytes
        return out
