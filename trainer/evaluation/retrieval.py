"""The held-out search of a contrastive run: recall@1/@10, MRR@10, nDCG@10, and BM25 beside it."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.data.heldout import EVAL_SEED, eval_indices
from trainer.data.pairs import RetrievalSet
from trainer.evaluation import EvalContext
from trainer.retrieval.bm25 import bm25_baseline
from trainer.retrieval.embedding import embed_rows
from trainer.retrieval.metrics import retrieval_metrics

RETRIEVAL_LOGGED = ("eval/recall@1", "eval/recall@10", "eval/mrr@10", "eval/ndcg@10")
HEADLINE = ("recall@1", "recall@10", "mrr@10", "ndcg@10")


def build_retrieval_set(corpus, objective, val_blocks, batch_size: int, eval_batches: int) -> RetrievalSet:
    """What a contrastive run's evaluation searches: the held-out pairs (`data=pairs`), or else the
    two halves of each block of the held-out sample (first half -> its second half)."""
    if hasattr(corpus, "retrieval"):
        return corpus.retrieval
    blocks = val_blocks[eval_indices(len(val_blocks), batch_size, eval_batches)]
    batch = objective.prepare(blocks, torch.Generator().manual_seed(EVAL_SEED))
    return RetrievalSet(queries=batch["a"], documents=batch["b"], positives=torch.arange(len(blocks)),
                        query_texts=[], document_texts=[])


class RetrievalSearch:
    """Searches every held-out query against every held-out document by cosine similarity.

    Identical documents are one document of the search (`trainer.data.pairs`), and identical
    queries count each other's positives as relevant (`retrieval_metrics`' `query_groups`).

    Every rank embeds everything (FSDP needs all ranks in each forward); the numbers are identical.

    Args:
        retrieval: the queries (Q, L), documents (D, L) and each query's positive (Q,).
        pad_id, pooling: how rows are padded and token states pooled (the objective's).
    """

    def __init__(self, retrieval: RetrievalSet, pad_id: int, pooling: str):
        self.retrieval, self.pad_id, self.pooling = retrieval, pad_id, pooling

    def baseline(self) -> dict[str, float]:
        """BM25 on the same search (the texts the encoder sees), `bm25/<metric>`; {} without texts."""
        r = self.retrieval
        if not r.query_texts:
            return {}
        out = bm25_baseline(r.query_texts, r.document_texts, r.positives, query_groups=r.query_groups)
        return {f"bm25/{k}": v for k, v in out.items() if k in HEADLINE}

    def describe_baseline(self, metrics: dict[str, float]) -> str:
        """The line a run prints with the baseline's numbers."""
        r = self.retrieval
        return (f"BM25 baseline on the {len(r.query_texts)} held-out queries x {len(r.document_texts)} documents "
                f"(the text the encoder sees): " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        r = self.retrieval
        q = embed_rows(model, r.queries, self.pad_id, self.pooling, ctx.batch_size, ctx.device, ctx.precision)
        d = embed_rows(model, r.documents, self.pad_id, self.pooling, ctx.batch_size, ctx.device, ctx.precision)
        scores = q @ d.T  # (Q, D)
        return {f"eval/{k}": v for k, v in retrieval_metrics(scores, r.positives, query_groups=r.query_groups).items()}
