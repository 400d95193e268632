"""The lexical baseline retrieval is judged against: BM25 (Robertson & Zaragoza 2009) through `bm25s`,
on a code-aware word split (identifiers split at underscores and camelCase)."""
from __future__ import annotations

import re
import time

import torch

from trainer.retrieval.metrics import retrieval_metrics


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
    import logging

    import bm25s  # imported when used: only runs with a held-out search need it, and it is slow to import

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets its own logger to DEBUG on import
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


def bm25_baseline(queries: list[bytes], documents: list[bytes], positives, ks: tuple[int, ...] = (1, 10),
                  query_groups: torch.Tensor | None = None) -> dict[str, float]:
    """BM25 (`bm25_scores`) ranked and scored by `retrieval_metrics`, exactly as an encoder is.

    Args:
        queries: Q query texts (UTF-8). documents: D document texts searched for every query.
        positives: Q indices into `documents` (a list or a (Q,) int64 tensor).
        query_groups: (Q,) optional: equal values mark identical queries (`positive_ranks`).
    Returns:
        The metrics of `retrieval_metrics`, plus "seconds": wall time of tokenizing, indexing and
        scoring (not of computing the metrics).
    """
    start = time.perf_counter()
    scores = bm25_scores(queries, documents)  # (Q, D)
    seconds = time.perf_counter() - start
    out = retrieval_metrics(scores, torch.as_tensor(positives, dtype=torch.long), ks, query_groups=query_groups)
    out["seconds"] = seconds
    return out
