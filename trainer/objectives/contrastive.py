"""Contrastive training for retrieval encoders: InfoNCE over the global batch, learned temperature,
and GradCache inside the loss.

A batch is a set of (query, document) rows; each query's positive is its own document and every
other document in the *global* batch is a negative (in-batch negatives, DPR: Karpukhin et al.
2020). The loss is `sum_i -log softmax_j(s * <q_i, d_j>)[i]` over the B queries of the global
batch, with unit-norm embeddings and scale `s = 1 / temperature` (fixed, or learned as CLIP's
`logit_scale`: Radford et al. 2021).

Identical texts are never negatives of each other: with retrieval pairs, `prepare` gives every row
the index of the first row holding the same query (`a_group`) and the same document (`b_group`),
and document j is left out of query i's softmax when d_j equals d_i (two queries for one
document) or q_j equals q_i (one query, two documents), as sentence-transformers' `no_duplicates`
sampler keeps such rows out of one batch. Without this, two queries for one document cap the loss
at ln 2 even with perfect embeddings. Self-supervised block rows carry no groups.

When the global batch is split (trainer.grad_accum > 1, or DDP/FSDP ranks), a naive per-piece
loss would see only the piece's own documents as negatives and change the objective. The loss
therefore implements GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup") the way sentence-transformers' cached losses do: its forward embeds
every mini-batch without a graph, gathers the embeddings of every rank and takes the whole batch's
loss and its gradient w.r.t. the embeddings; a hook on the returned loss then re-runs each
mini-batch with a graph during `loss.backward()` and back-propagates the cached gradients (times
the loss's incoming gradient, so loss scaling and the loop's normalisation apply unchanged).
Dropout is replayed exactly (each mini-batch's RNG state is restored), so the loss and gradients
equal those of one process with the whole batch. The loop just calls `loss` and `backward`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import gather_rows, grad_sync, world
from trainer.data.pairs import duplicate_groups
from trainer.errors import ConfigError
from trainer.objectives.base import Batch, Objective, split_rows
from trainer.retrieval.embedding import POOLINGS, embed

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned scale at 100 (temperature >= 0.01)


def info_nce(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor | float,
             same_document: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE of queries `q` (B, D) against documents `d` (B, D), positives on the diagonal.

    `same_document` (B, B) bool, optional: True where document j is not a negative of query i (the
    same document text, or the same query text: `same_text`); those off-diagonal entries are masked
    out of the softmax. Returns (loss summed over the B queries, number of queries whose top
    document among the rest is their own).
    """
    with torch.autocast(q.device.type, enabled=False):  # scores in fp32 under any autocast
        scores = (q.float() @ d.float().T) * scale  # (B, B)
    labels = torch.arange(len(q), device=q.device)
    if same_document is not None:
        false_negative = same_document & ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(false_negative, float("-inf"))
    return F.cross_entropy(scores, labels, reduction="sum"), (scores.argmax(-1) == labels).sum()


def same_text(a_group: torch.Tensor, b_group: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: True where rows i and j hold the same query or the same document (the groups of
    `duplicate_groups`, (B,) each): the entries `info_nce` must not count as negatives."""
    return (a_group[:, None] == a_group[None, :]) | (b_group[:, None] == b_group[None, :])


def _same_text(batch: Batch) -> torch.Tensor | None:
    return same_text(batch["a_group"], batch["b_group"]) if "a_group" in batch else None


def apply_learned_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Give `model` a learned `logit_scale` parameter = log(1 / temperature) (CLIP's), returned as is.

    DDP is told to leave it alone: the contrastive loss computes its gradient from the gathered
    global batch on every rank (identical everywhere), so it needs no all-reduce.
    """
    model.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
    # DDP matches this list against "<module>.<name>" (".logit_scale" for a root parameter in
    # recent torch versions, "logit_scale" in older ones): both spellings are listed.
    model._ddp_params_and_buffers_to_ignore = ["logit_scale", ".logit_scale"]
    return model


def _logit_scale_param(model: nn.Module) -> nn.Parameter | None:
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return getattr(inner, "logit_scale", None)


def logit_scale(model: nn.Module, temperature: float) -> torch.Tensor | float:
    """The scale the loss multiplies similarities by: exp(logit_scale) clamped at 100, or 1/temperature."""
    param = _logit_scale_param(model)
    return 1.0 / temperature if param is None else param.exp().clamp(max=MAX_LOGIT_SCALE)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class Contrastive(Objective):
    """In-batch InfoNCE for retrieval encoders (see the module docstring).

    Rows come in two forms. Retrieval pairs (`data=pairs`): blocks (B, 2, L), row i holding query i
    and its document, right-padded with `pad_id`. Plain text (`data=stdlib|text|hub`): blocks
    (B, L + 1), whose two halves are a positive pair (a self-supervised stand-in: which half is the
    query is drawn per row from the objective's generator).

    Args:
        temperature: InfoNCE temperature (the starting value when learned).
        pooling: one of `POOLINGS`. pad_id: the padding id of pair rows.
        mini_batches: GradCache pieces each rank's rows are embedded in (`trainer.grad_accum`).
    """

    name = "contrastive"
    rows_key = "a"

    def __init__(self, temperature: float, pooling: str = "mean", pad_id: int = -1, mini_batches: int = 1):
        if pooling not in POOLINGS:
            raise ConfigError(f"objective.pooling={pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}.")
        self.temperature, self.pooling, self.pad_id = temperature, pooling, pad_id
        self.mini_batches = mini_batches

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        if blocks.dim() == 3:  # (B, 2, L) query/document rows
            out = {}
            for key, rows in (("a", blocks[:, 0]), ("b", blocks[:, 1])):
                mask = rows != self.pad_id
                width = max(int(mask.sum(1).max()), 1) if len(rows) else 1  # drop all-padding columns
                out[key], out[f"{key}_mask"] = rows[:, :width], mask[:, :width]
                out[f"{key}_group"] = duplicate_groups(rows)  # (B,): identical rows share a group
            return out
        tokens = blocks[:, :-1]
        half = tokens.shape[1] // 2
        swap = torch.rand(tokens.shape[0], generator=gen) < 0.5  # which half is the query
        a, b = tokens[:, :half], tokens[:, half:2 * half]
        return {"a": torch.where(swap[:, None], b, a), "b": torch.where(swap[:, None], a, b)}

    def num_targets(self, batch: Batch) -> int:
        return batch["a"].shape[0]

    def tokens(self, batch: Batch) -> int:
        return sum(int(batch[f"{k}_mask"].sum()) if f"{k}_mask" in batch else batch[k].numel() for k in ("a", "b"))

    def micro_batches(self, batch: Batch, rank: int, world_size: int, grad_accum: int) -> list[Batch]:
        """One piece, this rank's rows: the loss splits it into `mini_batches` itself (GradCache)."""
        per_rank = batch["a"].shape[0] // world_size
        return [split_rows(batch, rank * per_rank, (rank + 1) * per_rank)]

    def eval_rows(self, batch: Batch, rank: int, world_size: int) -> tuple[Batch, bool]:
        """Negatives span the whole batch: every rank scores all of it, rank 0's numbers count."""
        return batch, rank == 0

    def embed(self, model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised pooled embeddings (B, D) fp32."""
        return embed(model, tokens, mask, self.pooling)

    def _embed_pair(self, model: nn.Module, m: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(model, m["a"], m.get("a_mask")), self.embed(model, m["b"], m.get("b_mask"))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed InfoNCE over the global batch, correct top-1) for this rank's `batch`.

        Training with several ranks or mini-batches runs GradCache (module docstring); every rank
        then holds the whole batch's loss and rank 0 reports it (others return zeros, as the loop
        sums metrics over ranks). Otherwise a plain forward over `batch`.
        """
        rank, world_size = world()
        if not (torch.is_grad_enabled() and model.training) or (world_size == 1 and self.mini_batches == 1):
            q, d = self._embed_pair(model, batch)
            return info_nce(q, d, logit_scale(model, self.temperature), _same_text(batch))
        return self._cached_loss(model, batch, rank, world_size)

    def _cached_loss(self, model: nn.Module, batch: Batch, rank: int, world_size: int):
        device = batch["a"].device
        rows = batch["a"].shape[0]
        n = max(1, min(self.mini_batches, rows))
        minis = [split_rows(batch, rows * i // n, rows * (i + 1) // n) for i in range(n)]
        amp = _autocast_state(device)
        states, qs, ds = [], [], []
        with torch.no_grad():  # 1. embeddings without a graph (the RNG state saved to replay dropout)
            for m in minis:
                states.append(_rng_state(device))
                q, d = self._embed_pair(model, m)
                qs.append(q)
                ds.append(d)
        q_local, d_local = torch.cat(qs), torch.cat(ds)  # (B_rank, D)
        q_all = gather_rows(q_local, world_size).requires_grad_(True)  # 2. the global batch on every rank
        d_all = gather_rows(d_local, world_size).requires_grad_(True)
        # Groups index the global batch (`prepare` saw all of it): gathered, they mask copies across ranks.
        same = None if "a_group" not in batch else same_text(
            gather_rows(batch["a_group"], world_size), gather_rows(batch["b_group"], world_size))  # (B, B)
        s_param = _logit_scale_param(model)
        with torch.enable_grad():
            loss, correct = info_nce(q_all, d_all, logit_scale(model, self.temperature), same)  # 3. the global loss
            grads = torch.autograd.grad(loss, [q_all, d_all, *([s_param] if s_param is not None else [])])
        lo = rank * rows
        gq, gd = grads[0][lo:lo + rows], grads[1][lo:lo + rows]

        def backward_hook(grad_output: torch.Tensor) -> torch.Tensor:
            # grad_output = what the loop multiplies the loss by (loss scale x world size / targets).
            # The learned scale is ignored by DDP and its gradient here is already the global one,
            # so it is not multiplied by the world size.
            if s_param is not None:
                g = grads[2] * (grad_output / world_size)
                s_param.grad = g if s_param.grad is None else s_param.grad + g
            start = 0
            with torch.enable_grad():
                for i, m in enumerate(minis):  # 4. re-run each piece with a graph, back-prop the cached grads
                    k = m["a"].shape[0]
                    _set_rng_state(states[i], device)
                    with grad_sync(model, i == len(minis) - 1), torch.autocast(device.type, amp[1], enabled=amp[0]):
                        q, d = self._embed_pair(model, m)
                        surrogate = ((q * gq[start:start + k]).sum() + (d * gd[start:start + k]).sum()) * grad_output
                    surrogate.backward()
                    start += k
            return grad_output

        out = loss.detach().requires_grad_(True)
        out.register_hook(backward_hook)
        if rank:  # every rank holds the whole batch's loss; the loop sums metrics over ranks
            zero = torch.zeros((), device=device, requires_grad=True)
            zero.register_hook(backward_hook)
            return zero, torch.zeros_like(correct)
        return out, correct.detach()
