"""IR metrics equal hand-computed values (ties pessimistic, NaN last), chunking changes nothing,
and the BM25 baseline scores exactly by the BM25 formula bm25s documents."""
from __future__ import annotations

import math

import pytest
import torch

import trainer.retrieval.metrics
from trainer.retrieval.bm25 import bm25_baseline, bm25_scores, tokenize
from trainer.retrieval.metrics import positive_ranks, retrieval_metrics

NAN = float("nan")


def _hand_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """7 queries x 12 documents whose positive ranks are worked out by hand below."""
    s = torch.zeros(7, 12)
    s[0] = torch.linspace(0.0, 0.5, 12)
    s[0, 3], s[0, 7] = 0.9, NAN  # positive 3 is highest; a NaN neighbour must not outrank it -> rank 0
    s[1] = torch.tensor([0.3, 0.3, 0.3, 0.8] + [0.1] * 8)  # positive 1: 1 higher + 2 ties -> rank 3
    s[2] = torch.arange(12.0)
    s[2, 0], s[2, 5] = NAN, NAN  # positive 0 is NaN (-inf): 10 higher + 1 NaN tie -> rank 11
    s[3] = 1.0  # a constant scorer: positive 5 ties with all 11 others -> rank 11 (never a lucky 0)
    s[4] = torch.arange(12.0)  # positive 2 has 9 higher (3..11) -> rank 9
    s[5] = torch.arange(12.0)  # positive 1 has 10 higher (2..11) -> rank 10, just outside the top 10
    s[6] = torch.tensor([5.0, 4.0] + [1.0] * 10)  # positive 1: 1 higher, no tie -> rank 1
    return s, torch.tensor([3, 1, 0, 5, 2, 1, 1])


def test_metrics_equal_hand_computed_values():
    scores, positives = _hand_matrix()
    assert positive_ranks(scores, positives).tolist() == [0, 3, 11, 11, 9, 10, 1]
    got = retrieval_metrics(scores, positives)
    # ranks 0, 3, 11, 11, 9, 10, 1 -> recall@1: 1 of 7; recall@10: ranks 0, 3, 9, 1 -> 4 of 7
    # MRR@10: (1/1 + 1/4 + 1/10 + 1/2) / 7 = 1.85 / 7
    # nDCG@10: (1/log2(2) + 1/log2(5) + 1/log2(11) + 1/log2(3)) / 7
    #        = (1 + 0.4306765581 + 0.2890648263 + 0.6309297536) / 7 = 2.3506711380 / 7
    assert got == pytest.approx({"recall@1": 1 / 7, "recall@10": 4 / 7, "mrr@10": 1.85 / 7,
                                 "ndcg@10": 0.3358101626}, abs=1e-10)


def test_other_cutoffs_and_bad_input():
    scores, positives = _hand_matrix()
    got = retrieval_metrics(scores, positives, ks=(1, 4, 12))  # MRR/nDCG cut at the largest k
    assert got == pytest.approx({"recall@1": 1 / 7, "recall@4": 3 / 7, "recall@12": 1.0,
                                 "mrr@12": (1 + 1 / 4 + 2 / 12 + 1 / 10 + 1 / 11 + 1 / 2) / 7,
                                 "ndcg@12": (1 + 1 / math.log2(5) + 2 / math.log2(13) + 1 / math.log2(11)
                                             + 1 / math.log2(12) + 1 / math.log2(3)) / 7})
    with pytest.raises(ValueError, match="positives must index the 12 documents"):
        retrieval_metrics(scores, torch.tensor([0, 1, 2, 3, 12, 0, 0]))
    with pytest.raises(ValueError, match=r"scores must be \(Q, D\) and positives \(Q,\)"):
        retrieval_metrics(scores, positives[:4])
    with pytest.raises(ValueError, match="at least one query"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_chunking_gives_the_unchunked_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (37, 53), generator=g).float()  # many ties
    scores[torch.rand(37, 53, generator=g) < 0.05] = NAN
    positives = torch.randint(0, 53, (37,), generator=g)
    full = positive_ranks(scores, positives, chunk_size=37)
    # reference: the definition, one query at a time in plain Python
    ref = []
    for row, p in zip(scores.tolist(), positives.tolist()):
        row = [-math.inf if math.isnan(x) else x for x in row]
        ref.append(sum(x > row[p] for x in row) + sum(x == row[p] for j, x in enumerate(row) if j != p))
    assert full.tolist() == ref
    for chunk in (1, 5, 36):
        assert torch.equal(positive_ranks(scores, positives, chunk_size=chunk), full)
        assert retrieval_metrics(scores, positives, chunk_size=chunk) == retrieval_metrics(scores, positives)
    monkeypatch.setattr(trainer.retrieval.metrics, "_MAX_CHUNK_ELEMENTS", 3 * 53)  # default chunk: 3 queries
    assert torch.equal(positive_ranks(scores, positives), full)


def test_tokenize_splits_code_identifiers():
    assert tokenize(b"def getHTTPResponse2(self, snake_case): return x+1  # caf\xc3\xa9 JSONDecoder") == \
        ["def", "get", "http", "response", "self", "snake", "case", "return", "café", "json", "decoder"]


def test_bm25_scores_follow_the_formula_by_hand():
    import bm25s

    r = bm25s.BM25()
    assert (r.k1, r.b, r.method) == (1.5, 0.75, "lucene")  # the defaults the formula below uses
    docs = [b"apple banana apple", b"banana cherry", b"cherry date elder fig"]
    got = bm25_scores([b"Apple cherry", b"kiwi", b"cherry cherry"], docs)
    k1, b, n, avgdl = 1.5, 0.75, 3, (3 + 2 + 4) / 3
    idf_apple = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))  # df(apple) = 1
    idf_cherry = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))  # df(cherry) = 2

    def tf_part(tf: int, length: int) -> float:
        return tf / (tf + k1 * (1 - b + b * length / avgdl))

    expected = torch.tensor([
        [idf_apple * tf_part(2, 3), idf_cherry * tf_part(1, 2), idf_cherry * tf_part(1, 4)],
        [0.0, 0.0, 0.0],  # no query term is in the index
        [0.0, 2 * idf_cherry * tf_part(1, 2), 2 * idf_cherry * tf_part(1, 4)],  # a repeated term counts twice
    ])
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[0].tolist() == pytest.approx([0.5604737, 0.2211784, 0.1634798], abs=1e-6)


def test_bm25_ranks_an_exact_copy_first_and_reports_metrics():
    docs = [b"def parse_header(line): return line.split(':')", b"class JSONDecoder: decode json text",
            b"async def read_chunk(stream, size): return await stream.read(size)",
            b"def sort_items(items, key): return sorted(items, key=key)"]
    queries = [docs[2], b"decode some JSON", b"nothing matches here"]
    got = bm25_baseline(queries, docs, [2, 1, 0])
    # ranks: 0 (the copy), 0 (JSON/decode only in doc 1), 3 (all four score 0: pessimistic)
    assert {k: v for k, v in got.items() if k != "seconds"} == pytest.approx(
        {"recall@1": 2 / 3, "recall@10": 1.0, "mrr@10": (1 + 1 + 1 / 4) / 3,
         "ndcg@10": (1 + 1 + 1 / math.log2(5)) / 3})
    assert got["seconds"] > 0
    scores = bm25_scores(queries, docs)
    assert scores[0].argmax() == 2
    assert positive_ranks(scores, torch.tensor([2, 1, 0])).tolist() == [0, 0, 3]
