"""Identical texts are one text: a document in a batch twice is never its own negative (plain loss,
held-out loss and GradCache across mini-batches), a query asked twice is not penalised for its
other answer, and the held-out search holds each distinct document once, so a perfect scorer and
BM25 find it; self-supervised block rows are unchanged."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from models.build import build_model
from test_contrastive import PAD, _loop, _pair_blocks
from trainer.data.pairs import load_pair_corpus
from trainer.data.tokenizer import ByteTokenizer
from trainer.objectives.contrastive import Contrastive
from trainer.retrieval.bm25 import bm25_baseline
from trainer.retrieval.metrics import positive_ranks, retrieval_metrics

SCALE = 50.0  # temperature 0.02


def _rows(texts: list[str], length: int = 16) -> torch.Tensor:
    """(N, length) byte rows, right-padded with PAD."""
    out = torch.full((len(texts), length), PAD)
    for i, t in enumerate(texts):
        out[i, :len(t)] = torch.tensor(list(t.encode()))
    return out


def _perfect(relevant: dict[str, set[str]], docs: list[str]):
    """An embedder that is as good as it can be: each document text its own axis, each query the
    normalised sum of the axes of its relevant documents."""
    axis = {d: i for i, d in enumerate(sorted(set(docs)))}

    def vec(texts: set[str]) -> torch.Tensor:
        v = torch.zeros(len(axis))
        v[[axis[t] for t in texts]] = 1.0
        return F.normalize(v, dim=0)

    def embed(model, tokens, mask=None):
        texts = [bytes(int(i) for i in row if i != PAD).decode() for row in tokens]
        return torch.stack([vec(relevant[t]) if t in relevant else vec({t}) for t in texts])
    return embed


def _hand_loss(queries: list[str], docs: list[str], relevant: dict[str, set[str]]) -> float:
    """Sum over rows i of -log softmax(SCALE * <q_i, d_j>)[i] over j = i and every row j whose query
    and document both differ from row i's (the negatives), computed in plain Python."""
    def cos(q: str, d: str) -> float:
        return (d in relevant[q]) / math.sqrt(len(relevant[q]))
    total = 0.0
    for i, q in enumerate(queries):
        js = [j for j in range(len(docs)) if j == i or (docs[j] != docs[i] and queries[j] != q)]
        total += -(SCALE * cos(q, docs[i]) - math.log(sum(math.exp(SCALE * cos(q, docs[j])) for j in js)))
    return total


@pytest.mark.parametrize("queries,docs", [
    (["qa1", "qa2", "qb"], ["doc A", "doc A", "doc B"]),  # two queries, one document
    (["qa1", "qa2", "qa3", "qb", "qc"], ["doc A", "doc A", "doc A", "doc B", "doc C"]),  # three
    (["qa1", "qb1", "qa2", "qb2", "qc"], ["doc A", "doc B", "doc A", "doc B", "doc C"]),  # two pairs of copies
    (["same q", "same q", "qc"], ["doc A", "doc B", "doc C"]),  # one query, two documents
    (["qa1", "qa1", "qb"], ["doc A", "doc A", "doc B"]),  # the same pair twice
])
def test_perfect_embeddings_give_no_loss_with_duplicates(queries, docs):
    """With perfect embeddings the loss is ~0 (the hand computation), not >= ln 2 per duplicated
    row as when a copy of the positive counts as a negative; the held-out (no-grad) path agrees."""
    relevant = {q: {d for qq, d in zip(queries, docs) if qq == q} for q in queries}
    obj = Contrastive(1 / SCALE, "mean", PAD)
    obj.embed = _perfect(relevant, docs)
    blocks = torch.stack([_rows(queries), _rows(docs)], dim=1)  # (B, 2, L)
    batch = obj.prepare(blocks, torch.Generator().manual_seed(0))
    model = torch.nn.Linear(1, 1)  # not used by the perfect embedder
    expected = _hand_loss(queries, docs, relevant)
    assert expected < 1e-6  # the independent value: ~e^-SCALE per negative
    for training in (True, False):
        model.train(training)
        loss, correct = obj.loss(model, batch)
        assert float(loss) == pytest.approx(expected, abs=1e-6)
        assert int(correct) == len(queries)
    duplicated = sum(docs.count(d) > 1 or queries.count(q) > 1 for q, d in zip(queries, docs))
    assert duplicated >= 2 and duplicated * math.log(2) > 1.0  # what the unmasked loss could not go below


def test_block_rows_carry_no_groups():
    """Self-supervised halves of text blocks are left as they were: no grouping keys, no mask."""
    obj = Contrastive(0.05, "mean", PAD)
    blocks = torch.randint(0, 256, (6, 33), generator=torch.Generator().manual_seed(0))
    blocks[3] = blocks[1]
    batch = obj.prepare(blocks, torch.Generator().manual_seed(0))
    assert set(batch) == {"a", "b"}


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32)


def test_grad_cache_with_duplicates_equals_one_batch_and_masks_copies():
    """grad_accum=4 (GradCache, copies spread over mini-batches) equals grad_accum=1, and both equal
    the masked InfoNCE computed by hand from the model's own embeddings of the batch."""
    from trainer.loop import train_step

    cfg = compose_cfg("model=encoder", "objective=contrastive")
    blocks = _pair_blocks(40, 24, 1)
    blocks[:, 1] = blocks[torch.arange(40) % 3, 1]  # only 3 distinct documents
    blocks[5:40:7, 0] = blocks[0, 0]  # and some queries repeated
    results = []
    for accum in (1, 4):
        model = _model(cfg)
        lp = _loop(cfg, model, blocks, Contrastive(0.05, "mean", PAD, mini_batches=accum), accum)
        out = train_step(lp, 0)
        results.append((float(out["loss_sum"]), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    (loss1, g1), (loss4, g4) = results
    assert loss4 == pytest.approx(loss1, abs=1e-5)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)
    # The reference: the same step-0 rows, embedded by the same weights, masked by comparing texts.
    rows = lp.stream.batch(0)  # (8, 2, L)
    model = _model(cfg).eval()
    obj = Contrastive(0.05, "mean", PAD)
    with torch.no_grad():
        q = obj.embed(model, rows[:, 0], rows[:, 0] != PAD)
        d = obj.embed(model, rows[:, 1], rows[:, 1] != PAD)
    expected = 0.0
    for i in range(8):
        same = [j for j in range(8) if j != i and (torch.equal(rows[j, 1], rows[i, 1]) or torch.equal(rows[j, 0], rows[i, 0]))]
        assert len(same) >= 1  # every row has a copy here
        s = [20.0 * float(q[i] @ d[j]) for j in range(8) if j not in same]
        expected += -(20.0 * float(q[i] @ d[i]) - math.log(sum(math.exp(x) for x in s)))
    assert loss1 == pytest.approx(expected, rel=1e-5)


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _pairs_cfg(tmp_path, train, val, corpus_lines):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(c + "\n" for c in corpus_lines))
    return compose_cfg("data=pairs", f"data.files=[{_write_jsonl(tmp_path / 'train.jsonl', train)}]",
                       f"data.val_files=[{_write_jsonl(tmp_path / 'val.jsonl', val)}]", f"data.corpus_files=[{corpus}]",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=64").data


_VAL = [{"query": "parse the http header", "document": "def parse_header(line): return line.split(':')"},
        {"query": "split a header line", "document": "def parse_header(line): return line.split(':')"},
        {"query": "decode json text", "document": "class JSONDecoder: decode json text"},
        {"query": "read a chunk from the stream", "document": "async def read_chunk(stream): return await stream.read()"},
        {"query": "sort the items by key", "document": "def sort_items(items, key): return sorted(items, key=key)"},
        {"query": "sort the items by key", "document": "def order_items(items, key): return sorted(items, key=key)"}]
_CORPUS = ["class JSONDecoder: decode json text", "unrelated distractor text", "unrelated distractor text"]


def test_search_holds_each_document_once_and_a_perfect_scorer_finds_all(tmp_path):
    """Held-out documents repeated (two queries, one document), a held-out document repeated in
    data.corpus_files, a corpus line repeated, one query with two documents: 5 distinct documents
    are searched; a perfect scorer (scores computed from the texts) gets recall@1 1.0, and so
    does BM25, whose every query has a word only its documents share."""
    cfg = _pairs_cfg(tmp_path, _VAL[:2] * 2, _VAL, _CORPUS)
    r = load_pair_corpus(cfg, 0, ByteTokenizer()).retrieval
    distinct = list(dict.fromkeys([v["document"] for v in _VAL] + _CORPUS))
    assert [t.decode() for t in r.document_texts] == distinct and len(r.documents) == len(distinct) == 6
    assert [r.document_texts[p].decode() for p in r.positives] == [v["document"] for v in _VAL]
    # The perfect scorer: 1 for every document relevant to the query's text, 0 elsewhere.
    relevant = {v["query"]: {w["document"] for w in _VAL if w["query"] == v["query"]} for v in _VAL}
    scores = torch.tensor([[float(d.decode() in relevant[q.decode()]) for d in r.document_texts]
                           for q in r.query_texts])
    got = retrieval_metrics(scores, r.positives, query_groups=r.query_groups)
    assert got == pytest.approx({"recall@1": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0})
    bm25 = bm25_baseline(r.query_texts, r.document_texts, r.positives, query_groups=r.query_groups)
    assert bm25["recall@1"] == pytest.approx(1.0)


def test_filtered_ranks_by_hand():
    """Queries 0 and 2 are the same text with positives 1 and 3: each rank leaves the other's
    positive out; query 1 (distinct) keeps every document, ties counted pessimistically."""
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.9, 0.5],
                           [0.8, 0.8, 0.3, 0.9, 0.1],
                           [0.1, 0.9, 0.2, 0.9, 0.95]])
    positives = torch.tensor([1, 0, 3])
    assert positive_ranks(scores, positives).tolist() == [1, 2, 2]
    groups = torch.tensor([0, 1, 0])
    assert positive_ranks(scores, positives, query_groups=groups).tolist() == [0, 2, 1]
    assert positive_ranks(scores, positives, chunk_size=1, query_groups=groups).tolist() == [0, 2, 1]
    m = retrieval_metrics(scores, positives, query_groups=groups)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_a_cli_run_searches_the_deduplicated_set(tmp_path):
    """A tiny run on user pairs whose held-out documents repeat (and repeat in data.corpus_files)
    searches 6 distinct documents, not 9, and BM25, which finds every document here, reports 1.0."""
    from conftest import run_cli, tiny_cli_args

    _pairs_cfg(tmp_path, _VAL[:2] * 4, _VAL, _CORPUS)  # writes train.jsonl, val.jsonl, corpus.txt
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny_cli_args(run_dir, "model=encoder", "objective=contrastive", "data=pairs",
                                  f"data.files=[{tmp_path / 'train.jsonl'}]", f"data.val_files=[{tmp_path / 'val.jsonl'}]",
                                  f"data.corpus_files=[{tmp_path / 'corpus.txt'}]", "data.seq_len=64",
                                  f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=4",
                                  "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BM25 baseline on the 6 held-out queries x 6 documents" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bm25/recall@1"] == pytest.approx(1.0) and summary["bm25/mrr@10"] == pytest.approx(1.0)
    assert 0.0 <= summary["eval/recall@1"] <= 1.0


def test_texts_that_differ_only_after_truncation_stay_two_documents(tmp_path):
    """The search merges identical texts, not texts that merely agree up to data.seq_len (the
    embedded task keeps all its 147 documents at seq_len 48); a training batch, which compares the
    rows the encoder sees, does treat such rows as the same input."""
    val = [{"query": "first query here", "document": "def parse_header(line): return line.split(':') # one"},
           {"query": "second query here", "document": "def parse_header(line): return line.split(':') # two"}]
    cfg = _pairs_cfg(tmp_path, val, val, ["unrelated"])
    cfg.seq_len = 16
    r = load_pair_corpus(cfg, 0, ByteTokenizer()).retrieval
    assert len(r.documents) == 3 and r.positives.tolist() == [0, 1] and r.query_groups is None
    assert torch.equal(r.documents[0], r.documents[1])  # the same 16 tokens
    batch = Contrastive(0.05, "mean", PAD).prepare(torch.stack([r.queries, r.documents[:2]], dim=1), None)
    assert batch["b_group"].tolist() == [0, 0] and batch["a_group"].tolist() == [0, 1]
