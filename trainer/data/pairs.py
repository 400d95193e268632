"""Retrieval pairs as token tensors: what `data=pairs` trains and evaluates on.

`trainer.data.code_pairs.build_pairs` gives the (query, document) texts, held out by file; this module
tokenizes them once into padded rows and keeps the held-out search set (held-out documents plus
`data.corpus_files`' extra documents) for retrieval evaluation.

Identical documents are one document: the held-out search holds each distinct document text once
(every query whose positive is that text points at the single copy, so a perfect scorer is never
tied with a copy of its own answer), and identical query texts are marked (`query_groups`) so each
counts the other's positive as relevant too. In a training batch the contrastive loss compares
token rows instead (`duplicate_groups`): rows the encoder cannot tell apart are never negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig
from trainer.data.tokenizer import ByteTokenizer, load_pretrained
from trainer.data.code_pairs import build_pairs


@dataclass
class RetrievalSet:
    """Held-out queries and the documents they are searched against (right-padded token rows)."""

    queries: torch.Tensor  # (Q, L) int64
    documents: torch.Tensor  # (D, L) int64, D >= Q
    positives: torch.Tensor  # (Q,) int64: the row of each query's document
    query_texts: list[bytes]  # the text of each row as the encoder sees it (after truncation)
    document_texts: list[bytes]
    # (Q,) int64: the first query row identical to each query (None: every query distinct)
    query_groups: torch.Tensor | None = None


@dataclass
class PairCorpus:
    """Rows (N, 2, L): row i is query i and its document, each BOS + tokens + EOS, padded."""

    train: torch.Tensor
    val: torch.Tensor
    retrieval: RetrievalSet
    num_docs: int  # pairs in all
    num_tokens: int  # real (non-padding) tokens in train + val
    tokenizer: object = None


def pair_tokenizer(cfg, say=print):
    """The tokenizer `data=pairs` encodes with: the byte tokenizer, or `tokenizer=pretrained`'s file
    (e.g. the tokenizer.json of the MLM run an encoder starts from). `validate` refuses
    `tokenizer=bpe` here, which trains on a language-model corpus."""
    return ByteTokenizer() if cfg.kind == "byte" else load_pretrained(cfg.path, say=say)


def encode_rows(texts: list[bytes], tokenizer, seq_len: int) -> torch.Tensor:
    """Texts -> (N, seq_len) int64: BOS + tokens + EOS, cut to `seq_len` (the EOS kept), right-padded
    with the tokenizer's pad id."""
    out = torch.full((len(texts), seq_len), tokenizer.pad_id, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, bos=True, eos=True)
        if len(ids) > seq_len:
            ids = ids[:seq_len - 1] + [tokenizer.eos_id]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def visible_texts(rows: torch.Tensor, tokenizer) -> list[bytes]:
    """The text each token row holds (specials dropped): what the encoder sees of each text after
    truncation, so a lexical baseline over these texts is judged on the same input."""
    return [tokenizer.decode([int(i) for i in row if i != tokenizer.pad_id]).encode("utf-8") for row in rows]


def duplicate_groups(rows: torch.Tensor) -> torch.Tensor:
    """(N,) int64: for each row of `rows` (N, ...), the index of the first row identical to it, so
    rows i and j hold the same tokens exactly when their groups are equal."""
    n = rows.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    _, inverse = torch.unique(rows.reshape(n, -1), dim=0, return_inverse=True)  # (N,) id of each distinct row
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(n), reduce="amin")  # first row of each id
    return first[inverse]


def _first_copies(texts: list[bytes]) -> torch.Tensor:
    """(N,) int64: for each text, the index of the first text equal to it."""
    first: dict[bytes, int] = {}
    return torch.tensor([first.setdefault(t, i) for i, t in enumerate(texts)], dtype=torch.long)


def _search_set(queries: torch.Tensor, documents: torch.Tensor, query_texts: list[bytes],
                document_texts: list[bytes], tokenizer) -> RetrievalSet:
    """The held-out search: `documents` (D0, L) rows of `document_texts`, the first Q of them the
    positives of the Q `queries` in order, each distinct text kept once (its first row) and every
    positive pointed at that copy."""
    first = _first_copies(document_texts)  # (D0,)
    keep = torch.nonzero(first == torch.arange(len(documents))).flatten()  # first copies, in order
    index = torch.full((len(documents),), -1, dtype=torch.long)
    index[keep] = torch.arange(len(keep))
    documents = documents[keep]
    groups = _first_copies(query_texts)
    return RetrievalSet(queries=queries, documents=documents, positives=index[first[:len(queries)]],
                        query_texts=visible_texts(queries, tokenizer), document_texts=visible_texts(documents, tokenizer),
                        query_groups=None if bool((groups == torch.arange(len(queries))).all()) else groups)


def load_pair_corpus(cfg: DataConfig, seed: int, tokenizer) -> PairCorpus:
    """The pairs of `cfg` (the standard-library task, or the user's .jsonl) as token rows.

    Raises:
        ConfigError: no pairs, or no held-out pair (bad files are named by `build_pairs`).
    """
    pairs = build_pairs(cfg, seed)
    if not pairs.train.queries or not pairs.val.queries:
        raise ConfigError(f"data=pairs: {len(pairs.train.queries)} training and {len(pairs.val.queries)} held-out "
                          f"pairs; both splits need at least one (add pairs or change data.val_fraction).")
    rows = {}
    for name, part in (("train", pairs.train), ("val", pairs.val)):
        q, d = encode_rows(part.queries, tokenizer, cfg.seq_len), encode_rows(part.documents, tokenizer, cfg.seq_len)
        rows[name] = torch.stack([q, d], dim=1)  # (N, 2, L)
    documents = torch.cat([rows["val"][:, 1], encode_rows(list(pairs.extra_documents), tokenizer, cfg.seq_len)])
    retrieval = _search_set(rows["val"][:, 0], documents, pairs.val.queries,
                            [*pairs.val.documents, *pairs.extra_documents], tokenizer)
    n_tokens = int(sum((r != tokenizer.pad_id).sum() for r in rows.values()))
    return PairCorpus(train=rows["train"], val=rows["val"], retrieval=retrieval,
                      num_docs=len(pairs.train.queries) + len(pairs.val.queries), num_tokens=n_tokens,
                      tokenizer=tokenizer)
