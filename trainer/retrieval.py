"""IR metrics for one-relevant-document-per-query retrieval, and the BM25 baseline (bm25s).

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
"""
from __future__ import annotations

import re
import time

import torch

_MAX_CHUNK_ELEMENTS = 1 << 24  # scores compared at once: ~Q_chunk x D, 64 MiB of float32


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """0-based pessimistic rank of each query's positive (see the module docstring).

    Args:
        scores: (Q, D) similarity of each query to each document (higher is more similar).
        positives: (Q,) int64 index in [0, D) of each query's relevant document.
        chunk_size: queries compared per step (default: ~16M scores at a time).
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
    ranks = []
    for start in range(0, q, chunk):
        s = scores[start:start + chunk]  # (C, D)
        s = s.masked_fill(torch.isnan(s), float("-inf"))
        pos = s.gather(1, positives[start:start + chunk, None])  # (C, 1)
        higher = (s > pos).sum(1)
        ties = (s == pos).sum(1) - 1  # every other document with the positive's score
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
                      chunk_size: int | None = None) -> dict[str, float]:
    """`{"recall@1", "recall@10", "mrr@10", "ndcg@10"}` (for the default `ks`) of a score matrix.

    Args:
        scores: (Q, D) similarity of each query to every document; NaN counts as -inf.
        positives: (Q,) int64 index of each query's one relevant document.
        ks: recall cut-offs; MRR and nDCG are cut at max(ks).
        chunk_size: queries ranked at once (memory ~ chunk_size x D).
    Raises:
        ValueError: mismatched shapes, out-of-range positives, or no queries.
    """
    return metrics_from_ranks(positive_ranks(scores, positives, chunk_size), ks)


_WORD = re.compile(r"[^\W_]+")  # letter/digit runs: underscores and punctuation separate
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")  # HTTPServer -> HTTP, Server


def tokenize(text: bytes | str) -> list[str]:
    """BM25 terms for code and English alike: letter/digit runs, ASCII runs further split at
    camelCase and letter/digit boundaries (`getHTTPResponse2` -> get, http, response), lowercased;
    single characters are dropped (as bm25s's and scikit-learn's default `\\w\\w+` pattern does).
    No stemming and no stopwords: `self`, `return` and `the` are left to the IDF weight."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    terms = []
    for run in _WORD.findall(text):
        parts = _CAMEL.findall(run) if run.isascii() else [run]
        terms += [p.lower() for p in parts if len(p) > 1]
    return terms


def bm25_scores(queries: list[bytes], documents: list[bytes]) -> torch.Tensor:
    """(Q, D) float32 BM25 score of every query against every document, from `bm25s` with its
    defaults (Lucene variant, k1=1.5, b=0.75): score(q, d) = sum over query terms t (repeats
    counted) of log(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)).
    """
    import bm25s

    retriever = bm25s.BM25()
    doc_terms = [tokenize(d) for d in documents]
    if not any(doc_terms):  # nothing to index: every document scores 0
        return torch.zeros(len(queries), len(documents))
    retriever.index(doc_terms, show_progress=False)
    vocab = retriever.vocab_dict
    rows = []
    for query in queries:
        ids = [vocab[t] for t in tokenize(query) if t in vocab]
        rows.append(torch.from_numpy(retriever.get_scores_from_ids(ids)).float())  # (D,)
    return torch.stack(rows) if rows else torch.zeros(0, len(documents))


def bm25_baseline(queries: list[bytes], documents: list[bytes], positives, ks: tuple[int, ...] = (1, 10)
                  ) -> dict[str, float]:
    """BM25 (`bm25_scores`) ranked and scored by `retrieval_metrics`, exactly as an encoder is.

    Args:
        queries: Q query texts (UTF-8). documents: D document texts searched for every query.
        positives: Q indices into `documents` (a list or a (Q,) int64 tensor).
    Returns:
        The metrics of `retrieval_metrics`, plus "seconds": wall time of tokenizing, indexing and
        scoring (not of computing the metrics).
    """
    start = time.perf_counter()
    scores = bm25_scores(queries, documents)  # (Q, D)
    seconds = time.perf_counter() - start
    out = retrieval_metrics(scores, torch.as_tensor(positives, dtype=torch.long), ks)
    out["seconds"] = seconds
    return out
