"""The objective interface: turn packed token blocks into inputs/targets and compute summed losses.

Every objective returns (loss_sum, num_correct) over its predicted positions; the loop divides
by the global number of targets, known before any forward pass (`num_targets`), so the gradient
is the same however the batch is split across ranks and accumulation steps.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.tokenizer import ByteTokenizer

Batch = Dict[str, torch.Tensor]


class Objective:
    """Base class: `prepare` builds a batch from blocks, `loss` runs the model on it."""

    name = "base"
    rows_key = "x"  # the batch key whose first dim is the sample dim
    z_loss = 0.0  # PaLM z-loss coefficient on the training loss (`cross_entropy_sum`); set by build_objective

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def num_targets(self, batch: Batch) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tokens(self, batch: Batch) -> int:
        """Input tokens processed (for tokens/s)."""
        return sum(v.numel() for k, v in batch.items() if k in ("x", "src", "tgt_in", "a", "b"))

    def num_target_bytes(self, batch: Batch) -> int | None:
        """UTF-8 bytes of the text the predicted targets stand for (None: bits/byte undefined)."""
        return None

    def micro_batches(self, batch: Batch, rank: int, world_size: int, grad_accum: int) -> list[Batch]:
        """This rank's rows of the global `batch`, cut into `grad_accum` micro-batches.

        The loop runs `loss` + one backward on each. Objectives whose loss couples rows (in-batch
        negatives) override this to return one piece and split it inside their loss.
        """
        rows = batch[self.rows_key].shape[0]
        per_rank = rows // world_size
        micro = per_rank // grad_accum
        start = rank * per_rank
        return [split_rows(batch, start + i * micro, start + (i + 1) * micro) for i in range(grad_accum)]

    def eval_rows(self, batch: Batch, rank: int, world_size: int) -> tuple[Batch, bool]:
        """(the rows of a held-out `batch` this rank scores, whether its sums count).

        Default: contiguous, near-equal shares whose sums are added over ranks.
        """
        rows = batch[self.rows_key].shape[0]
        lo, hi = rows * rank // world_size, rows * (rank + 1) // world_size
        return split_rows(batch, lo, hi), True


class Specials:
    """The tokenizer facts an objective needs: special ids, sentinels, bytes per id, regular ids."""

    def __init__(self, tokenizer=None):
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        self.pad, self.bos, self.eos, self.mask = tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id
        self.num_sentinels = tok.num_sentinels
        self.sentinels = np.array([tok.sentinel(i) for i in range(tok.num_sentinels)], dtype=np.int64)
        nbytes = tok.token_bytes()
        self.token_bytes = torch.from_numpy(np.asarray(nbytes, dtype=np.int64))
        special = np.zeros(len(nbytes), dtype=bool)
        special[[self.pad, self.bos, self.eos, self.mask, *self.sentinels.tolist()]] = True
        if isinstance(tok, ByteTokenizer):
            special[256:] = True  # every id above the bytes is special
        self.is_special = torch.from_numpy(special)
        self.regular = torch.from_numpy(np.flatnonzero(~special))  # ids MLM may substitute

    def count_bytes(self, targets: torch.Tensor) -> int:
        """Total UTF-8 bytes of `targets` (ids): specials count 0."""
        return int(self.token_bytes[targets.cpu()].sum())


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor,
                      z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in nats, number of argmax hits) of `logits` (..., V) against ids (...).

    The softmax runs in fp32 whatever the autocast dtype. `z_loss` > 0 adds PaLM's auxiliary
    z-loss (Chowdhery et al. 2022, section 5: coef * log(Z)^2 per target, Z the softmax
    normalizer, which keeps log Z near 0 and the logits from drifting) to the sum, but only while
    gradients are recorded: the loss trained on (and logged as train/loss) includes it, a held-out
    evaluation (under no_grad) scores the plain cross-entropy.
    """
    logits = logits.float()  # fp32 softmax: stable under bf16/fp16 autocast
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    loss = F.cross_entropy(flat, target.reshape(-1), reduction="sum")
    if z_loss and torch.is_grad_enabled():
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).square().sum()
    correct = (logits.argmax(-1) == target).sum()
    return loss, correct


def split_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every tensor in the batch (a rank's slice or a micro-batch)."""
    return {k: v[start:stop] for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of `batch` on `device` (non-blocking copies)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
