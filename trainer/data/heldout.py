"""The held-out sample every evaluation scores: fixed, and spread over the whole validation split.

Validation blocks are stored in document order (the split is by file), so "the first N blocks"
would be the first few held-out files. The sample here is a systematic one: `n` blocks at evenly
spaced positions across the split (all of it when it is small), identical at every evaluation,
in every job of a sweep and in the quantization report, so its numbers are comparable.
"""
from __future__ import annotations

from typing import Iterator

import torch

EVAL_SEED = 1234  # the held-out masks' generator seed (fixed: comparable across steps, jobs and reports)


def eval_indices(num_blocks: int, batch_size: int, num_batches: int) -> torch.Tensor:
    """Indices (int64, sorted, distinct) of the validation blocks evaluated.

    `min(num_blocks, batch_size * num_batches)` blocks: block `floor((i + 0.5) * N / n)` for
    i in 0..n-1, i.e. the midpoints of n equal slices of the split (every block when n == N).
    """
    n = min(num_blocks, batch_size * num_batches)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * (num_blocks / n)).floor().long()


def eval_sample(blocks, batch_size: int, num_batches: int) -> Iterator[torch.Tensor]:
    """The evaluated blocks as batches of `batch_size` rows (the last may be shorter).

    Args:
        blocks: validation blocks (N, seq_len + 1): a tensor, or the memory-mapped
            `trainer.data.StoreBlocks` (only the sampled rows are read). batch_size: rows per batch.
        num_batches: how many batches at most (`trainer.eval_batches`).
    """
    idx = eval_indices(len(blocks), batch_size, num_batches)
    for start in range(0, len(idx), batch_size):
        yield blocks[idx[start:start + batch_size]]


def held_out_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The by-document split every dataset built from one corpus shares: (train, val) document
    indices, each sorted. `max(1, round(num_docs * val_fraction))` documents are held out (none
    when there is a single document), chosen by a permutation seeded with `seed`.

    The LM blocks (`trainer.data`) and the retrieval pairs (`trainer.pairs`) both split with this,
    so a file held out from one is held out from the other.
    """
    import numpy as np

    order = np.random.default_rng(seed).permutation(num_docs)
    n_val = max(1, round(num_docs * val_fraction)) if num_docs >= 2 else 0
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])
