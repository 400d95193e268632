"""Precision and quantization judged by retrieval: each variant's size, embedding throughput and
recall@1/@10, MRR@10, nDCG@10 on the held-out search, side by side, with deltas against fp32."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from trainer.quantize.report import MB, _sync, state_dict_bytes
from trainer.retrieval.embedding import embed_rows
from trainer.retrieval.metrics import retrieval_metrics

METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")

def compare_retrieval(variants: dict[str, tuple[nn.Module, str]], retrieval, pad_id: int, pooling: str,
                      batch_size: int, device: torch.device, repeats: int = 3, baseline: str = "fp32",
                      throughput_docs: int = 512) -> dict[str, dict]:
    """Retrieval quality and embedding throughput of every variant.

    Args:
        variants: {name: (model, precision)}; precision is the autocast each runs under.
        retrieval: a `trainer.pair_data.RetrievalSet` (held-out queries, documents, positives).
        repeats: timed passes per variant over the same `throughput_docs` documents; variants take
            turns in a rotating order so machine noise hits them alike; the median pass counts.
    Returns:
        {name: {size_mb, docs_per_s, recall@1, recall@10, mrr@10, ndcg@10, and *_delta against
        `baseline` (absolute, in metric points), size_ratio, speedup}}.
    """

    rows: dict[str, dict] = {}
    for name, (model, precision) in variants.items():
        q = embed_rows(model, retrieval.queries, pad_id, pooling, batch_size, device, precision)
        d = embed_rows(model, retrieval.documents, pad_id, pooling, batch_size, device, precision)
        rows[name] = {"precision": precision, "size_mb": state_dict_bytes(model.state_dict()) / MB,
                      **retrieval_metrics(q @ d.T, retrieval.positives,
                                           query_groups=getattr(retrieval, "query_groups", None))}
    timed_rows = retrieval.documents[:throughput_docs]
    names, times = list(variants), {name: [] for name in variants}
    for r in range(repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, precision = variants[name]
            _sync(device)
            start = time.perf_counter()
            embed_rows(model, timed_rows, pad_id, pooling, batch_size, device, precision)
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    ref = rows[baseline]
    for name, row in rows.items():
        row["docs_per_s"] = len(timed_rows) / statistics.median(times[name])
    for row in rows.values():
        row.update({f"{k}_delta": row[k] - ref[k] for k in METRICS},
                   size_ratio=ref["size_mb"] / row["size_mb"], speedup=row["docs_per_s"] / ref["docs_per_s"])
    return rows

def format_retrieval_table(rows: dict[str, dict]) -> str:
    """A markdown table of compare_retrieval's rows."""
    lines = ["| variant | autocast | size MB | size vs fp32 | docs/s | speed vs fp32 | recall@1 | recall@10 | MRR@10 "
             "| nDCG@10 | Δ recall@10 | Δ MRR@10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['precision']} | {r['size_mb']:.3f} | {1 / r['size_ratio']:.0%} | "
                     f"{r['docs_per_s']:.1f} | {r['speedup']:.2f}x | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
                     f"{r['mrr@10']:.3f} | {r['ndcg@10']:.3f} | {r['recall@10_delta']:+.3f} | {r['mrr@10_delta']:+.3f} |")
    return "\n".join(lines)
