"""Contrastive training for retrieval encoders: pooling, InfoNCE over the global batch, GradCache.

A batch is a set of (query, document) rows; each query's positive is its own document and every
other document in the *global* batch is a negative (in-batch negatives, DPR: Karpukhin et al.
2020). The loss is `sum_i -log softmax_j(s * <q_i, d_j>)[i]` over the B queries of the global
batch, with unit-norm embeddings and scale `s = 1 / temperature` (fixed, or learned as CLIP's
`logit_scale`: Radford et al. 2021).

When the global batch is split (trainer.grad_accum > 1, or DDP ranks), a naive per-piece loss
would see only the piece's own documents as negatives and change the objective. `grad_cache_step`
implements GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): embed every piece without a graph, gather the embeddings of every rank,
take the loss and its gradient w.r.t. the embeddings for the whole batch, then re-run each piece
with a graph and back-propagate those cached gradients. Dropout is replayed exactly (the RNG state
of each piece is restored), so the loss and gradients equal those of one process with the whole
batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ConfigError
from trainer.objectives import Batch, Objective

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned scale at 100 (temperature >= 0.01)
POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Token states (B, T, D) -> one vector per row (B, D), in fp32.

    `mean`: the average over real tokens (`mask` (B, T) True at real tokens; None: all real),
    as Sentence-BERT (Reimers & Gurevych 2019). `cls`: the first position's state (BERT's [CLS];
    our rows start with BOS).
    """
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ConfigError(f"objective.pooling={pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}.")
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def embed(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """L2-normalised embeddings (B, D) fp32 of `tokens` (B, T) with padding `mask` (B, T)."""
    return F.normalize(pool(model(tokens, mask=mask, head=False), mask, pooling), dim=-1)


def info_nce(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE of queries `q` (B, D) against documents `d` (B, D), positives on the diagonal.

    Returns (loss summed over the B queries, number of queries whose top document is their own).
    """
    scores = (q @ d.T) * scale  # (B, B)
    labels = torch.arange(len(q), device=q.device)
    return F.cross_entropy(scores, labels, reduction="sum"), (scores.argmax(-1) == labels).sum()


def apply_learned_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Give `model` a learned `logit_scale` parameter = log(1 / temperature) (CLIP's), returned as is.

    DDP is told to leave it alone: the contrastive step computes its gradient from the gathered
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


def _gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows of `t` (B_local, D), concatenated in rank order -> (B_global, D)."""
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def grad_cache_step(lp, micros: list[Batch], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the global-batch InfoNCE over this rank's micro-batches (GradCache).

    Args:
        lp: the `trainer.loop.Loop` (model, objective, scaler, dist, device, precision).
        micros: this rank's micro-batches (dicts with a/b tokens and masks).
        total: the global number of queries (the loss is a mean over it).
    Returns:
        (global loss sum, global number correct) as tensors, identical on every rank. Gradients
        are left in `.grad` as one backward of the whole batch's mean loss would leave them
        (after DDP's average over ranks).
    """
    from trainer.loop import _sync_context, _to_device
    from trainer.precision import autocast

    obj, model, device, world = lp.objective, lp.model, lp.device, lp.dist.world_size
    micros = [_to_device(m, device) for m in micros]
    states, qs, ds = [], [], []
    with torch.no_grad():  # 1. embeddings without a graph (the RNG state saved to replay dropout)
        for m in micros:
            states.append(_rng_state(device))
            with autocast(lp.precision, device):
                qs.append(obj.embed(model, m["a"], m.get("a_mask")))
                ds.append(obj.embed(model, m["b"], m.get("b_mask")))
    q_local, d_local = torch.cat(qs), torch.cat(ds)  # (B_rank, D)
    q_all = _gather(q_local, world).requires_grad_(True)  # 2. the whole global batch on every rank
    d_all = _gather(d_local, world).requires_grad_(True)
    s_param = _logit_scale_param(model)
    loss, correct = info_nce(q_all, d_all, logit_scale(model, obj.temperature))  # 3. the global loss
    grads = torch.autograd.grad(loss, [q_all, d_all, *([s_param] if s_param is not None else [])])
    # Gradients leave this step scaled like the loop's: x loss scale (fp16) / total targets, and x world
    # size for the model, whose gradients DDP averages over ranks. The learned scale is ignored by DDP
    # and its gradient here is already the global one, so it is not multiplied by the world size.
    factor = lp.scaler.get_scale() if lp.scaler.is_enabled() else 1.0
    if s_param is not None:
        g = grads[2] * (factor / total)
        s_param.grad = g if s_param.grad is None else s_param.grad + g
    lo = lp.dist.rank * len(q_local)
    gq, gd = (g[lo:lo + len(q_local)] * (world * factor / total) for g in grads[:2])
    start = 0
    for i, m in enumerate(micros):  # 4. re-run each piece with a graph, back-propagate the cached grads
        n = m["a"].shape[0]
        _set_rng_state(states[i], device)
        with _sync_context(model, i == len(micros) - 1):
            with autocast(lp.precision, device):
                q = obj.embed(model, m["a"], m.get("a_mask"))
                d = obj.embed(model, m["b"], m.get("b_mask"))
            surrogate = (q * gq[start:start + n]).sum() + (d * gd[start:start + n]).sum()
            surrogate.backward()
        start += n
    # Every rank holds the whole batch's loss; the loop sums its metrics over ranks, so rank 0 reports it.
    if lp.dist.rank:
        return torch.zeros_like(loss.detach()), torch.zeros_like(correct)
    return loss.detach(), correct.detach()


class Contrastive(Objective):
    """In-batch InfoNCE for retrieval encoders (see the module docstring).

    Rows come in two forms. Retrieval pairs (`data=pairs`): blocks (B, 2, L), row i holding query i
    and its document, right-padded with `pad_id`. Plain text (`data=stdlib|text|hub`): blocks
    (B, L + 1), whose two halves are a positive pair (a self-supervised stand-in: which half is the
    query is drawn per row from the objective's generator).
    """

    name = "contrastive"
    rows_key = "a"
    global_negatives = True  # the loop must not split the batch's negatives (GradCache / whole-batch eval)

    def __init__(self, temperature: float, pooling: str = "mean", pad_id: int = -1):
        if pooling not in POOLINGS:
            raise ConfigError(f"objective.pooling={pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}.")
        self.temperature, self.pooling, self.pad_id = temperature, pooling, pad_id

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        if blocks.dim() == 3:  # (B, 2, L) query/document rows
            out = {}
            for key, rows in (("a", blocks[:, 0]), ("b", blocks[:, 1])):
                mask = rows != self.pad_id
                width = max(int(mask.sum(1).max()), 1) if len(rows) else 1  # drop all-padding columns
                out[key], out[f"{key}_mask"] = rows[:, :width], mask[:, :width]
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

    def embed(self, model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised pooled embeddings (B, D) fp32."""
        return embed(model, tokens, mask, self.pooling)

    def loss(self, model, batch):
        q = self.embed(model, batch["a"], batch.get("a_mask"))
        d = self.embed(model, batch["b"], batch.get("b_mask"))
        return info_nce(q, d, logit_scale(model, self.temperature))


@torch.no_grad()
def embed_rows(model: nn.Module, rows: torch.Tensor, pad_id: int, pooling: str, batch_size: int,
               device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Embeddings (N, D) fp32 on the CPU of right-padded token rows (N, L), `batch_size` rows at a
    time (each batch cut to its longest row), under the run's autocast."""
    from trainer.precision import autocast

    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        mask = part != pad_id
        width = max(int(mask.sum(1).max()), 1)
        with autocast(precision, device):
            out.append(embed(model, part[:, :width].to(device), mask[:, :width].to(device), pooling).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate_retrieval(lp, queries: torch.Tensor, documents: torch.Tensor,
                       positives: torch.Tensor) -> dict[str, float]:
    """recall@1, recall@10, MRR@10 and nDCG@10 of the held-out queries (Q, L) searched against every
    held-out document (D, L) by cosine similarity (`positives` (Q,): each query's document row).

    Every rank embeds everything (FSDP needs all ranks in each forward); the numbers are identical.
    """
    from trainer.retrieval import retrieval_metrics

    obj, was_training = lp.objective, lp.model.training
    lp.model.eval()
    try:
        q = embed_rows(lp.model, queries, obj.pad_id, obj.pooling, lp.cfg.batch_size, lp.device, lp.precision)
        d = embed_rows(lp.model, documents, obj.pad_id, obj.pooling, lp.cfg.batch_size, lp.device, lp.precision)
    finally:
        lp.model.train(was_training)
    return {f"eval/{k}": v for k, v in retrieval_metrics(q @ d.T, positives).items()}
