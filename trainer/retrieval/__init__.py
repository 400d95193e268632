"""Retrieval: pooling and embedding (`embedding`), IR metrics (`metrics`), the BM25 baseline (`bm25`)."""
from trainer.retrieval.bm25 import bm25_baseline
from trainer.retrieval.metrics import retrieval_metrics

__all__ = ["bm25_baseline", "retrieval_metrics"]
