"""IR metrics for one-relevant-document-per-query retrieval: recall@k, MRR@k, nDCG@k.

Definitions (binary relevance, one relevant document per query, as in BEIR's use of trec_eval;
Manning, Raghavan & Schuetze, "Introduction to Information Retrieval", ch. 8): with `rank` the
0-based position of the query's positive in the ranking,

    recall@k = 1 if rank < k else 0
    MRR@k    = 1 / (rank + 1) if rank < k else 0
    nDCG@k   = 1 / log2(rank + 2) if rank < k else 0     (the ideal DCG is 1/log2(2) = 1)

each averaged over queries. Ties are broken pessimistically: rank = #documents scoring strictly
higher + #other documents scoring the same, so a constant scorer gets the worst rank, not a lucky
one (trec_eval breaks ties by document id, which can reward a degenerate model). NaN scores count
as -inf.

Identical queries (`query_groups`): a query text asked twice with two different positives has both
documents relevant; each copy's rank leaves out the other copy's positive (the "filtered" rank of
Bordes et al. 2013), so a perfect scorer gets rank 0 for both instead of a miss for one.
"""
from __future__ import annotations


import torch

_MAX_CHUNK_ELEMENTS = 1 << 24  # scores compared at once: ~Q_chunk x D, 64 MiB of float32


def _other_positives(positives: torch.Tensor, query_groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64: query `rows[k]` also counts document `cols[k]` relevant (the positive of
    an identical query), its own positive excluded. Only groups of two or more queries are visited."""
    rows: list[int] = []
    cols: list[int] = []
    if query_groups is not None and len(query_groups):
        groups = query_groups.cpu().long()
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        members: dict[int, list[int]] = {}
        for i in torch.nonzero(counts[inverse] > 1).flatten().tolist():
            members.setdefault(int(groups[i]), []).append(i)
        pos = positives.cpu().tolist()
        for group in members.values():
            docs = sorted({pos[i] for i in group})
            for i in group:
                rows += [i] * (len(docs) - 1)
                cols += [d for d in docs if d != pos[i]]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk_size: int | None = None,
                   query_groups: torch.Tensor | None = None) -> torch.Tensor:
    """0-based pessimistic rank of each query's positive (see the module docstring).

    Args:
        scores: (Q, D) similarity of each query to each document (higher is more similar).
        positives: (Q,) int64 index in [0, D) of each query's relevant document.
        chunk_size: queries compared per step (default: ~16M scores at a time).
        query_groups: (Q,) int64, optional: queries with equal values are the same text; the
            positives of the others are left out of each one's rank.
    Returns:
        (Q,) int64 ranks on `scores`' device.
    Raises:
        ValueError: shapes that do not match, or a positive outside [0, D).
    """
    if scores.dim() != 2 or positives.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (Q, D) and positives (Q,); got {tuple(scores.shape)} and "
                         f"{tuple(positives.shape)}.")
    q, d = scores.shape
    positives = positives.to(device=scores.device, dtype=torch.long)
    if q and (positives.min() < 0 or positives.max() >= d):
        raise ValueError(f"positives must index the {d} documents; got values in "
                         f"[{int(positives.min())}, {int(positives.max())}].")
    chunk = chunk_size or max(1, _MAX_CHUNK_ELEMENTS // max(d, 1))
    other_rows, other_cols = (t.to(scores.device) for t in _other_positives(positives, query_groups))
    ranks = []
    for start in range(0, q, chunk):
        s = scores[start:start + chunk]  # (C, D)
        s = s.masked_fill(torch.isnan(s), float("-inf"))
        pos = s.gather(1, positives[start:start + chunk, None])  # (C, 1)
        counted = torch.ones_like(s, dtype=torch.bool)  # (C, D): documents that compete with the positive
        here = (other_rows >= start) & (other_rows < start + len(s))
        counted[other_rows[here] - start, other_cols[here]] = False
        higher = ((s > pos) & counted).sum(1)
        ties = ((s == pos) & counted).sum(1) - 1  # every other competing document with the positive's score
        ranks.append(higher + ties)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=scores.device)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """recall@k for each k in `ks`, and MRR and nDCG at the largest k, averaged over queries.

    Args:
        ranks: (Q,) 0-based ranks of the positives (`positive_ranks`), Q >= 1.
    """
    if ranks.numel() == 0:
        raise ValueError("retrieval metrics need at least one query.")
    r = ranks.double().cpu()
    cut = max(ks)
    hit = r < cut
    out = {f"recall@{k}": float((r < k).double().mean()) for k in ks}
    out[f"mrr@{cut}"] = float(torch.where(hit, 1.0 / (r + 1), 0.0).mean())
    out[f"ndcg@{cut}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2), 0.0).mean())
    return out


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 10),
                      chunk_size: int | None = None, query_groups: torch.Tensor | None = None) -> dict[str, float]:
    """`{"recall@1", "recall@10", "mrr@10", "ndcg@10"}` (for the default `ks`) of a score matrix.

    Args:
        scores: (Q, D) similarity of each query to every document; NaN counts as -inf.
        positives: (Q,) int64 index of each query's one relevant document.
        ks: recall cut-offs; MRR and nDCG are cut at max(ks).
        chunk_size: queries ranked at once (memory ~ chunk_size x D).
        query_groups: (Q,) optional: equal values mark identical queries (see `positive_ranks`).
    Raises:
        ValueError: mismatched shapes, out-of-range positives, or no queries.
    """
    return metrics_from_ranks(positive_ranks(scores, positives, chunk_size, query_groups), ks)
