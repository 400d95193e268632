"""The data path: documents (`sources`) -> tokenizer (`tokenizer`) -> memory-mapped token store
(`store`) -> batches by step. `load_corpus` builds the store once per files+settings+tokenizer
(cached under `data.cache_dir`, atomically) and opens it memory-mapped, so a second start is
quick and memory does not grow with the corpus. `data.streaming=true` reads through `datasets`'
streaming mode instead (`trainer.data.streaming`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig, TokenizerConfig
from trainer.data import sources
from trainer.data.sources import load_documents, stdlib_files
from trainer.data.store import BatchStream, StoreBlocks, finish_store, open_store, write_store
from trainer.data.tokenizer import BOS, EOS, MASK, NUM_SENTINELS, PAD, SENTINEL0, VOCAB_SIZE, ByteTokenizer, HFTokenizer, load_pretrained, load_tokenizer_json, model_vocab_size, texts_of, tokenizer_file, train_bpe
from trainer.data.heldout import held_out_documents

_FORMAT_VERSION = 4  # bump when tokenization, packing or the store layout changes (invalidates caches)
BPE_TRAIN_BYTES = 32 << 20  # tokenizer=bpe learns its merges from at most this much training text

__all__ = ["PAD", "BOS", "EOS", "MASK", "SENTINEL0", "VOCAB_SIZE", "NUM_SENTINELS", "BatchStream", "Corpus",
           "StoreBlocks", "ByteTokenizer", "HFTokenizer", "load_corpus", "stdlib_files", "model_vocab_size"]


@dataclass
class Corpus:
    """A tokenized corpus: memory-mapped train/validation blocks of `seq_len + 1` tokens (one extra
    for next-token targets) and the tokenizer that made them."""

    train_blocks: StoreBlocks | None  # (N_train, seq_len + 1) rows read on demand; None when streamed
    val_blocks: StoreBlocks | torch.Tensor  # (N_val, seq_len + 1)
    num_docs: int
    num_tokens: int
    tokenizer: ByteTokenizer | HFTokenizer
    store_dir: str = ""
    skip_docs: int = 0  # data.streaming: documents at the stream's head held out for validation

    @property
    def train(self) -> torch.Tensor:
        """Every training block as one (N_train, seq_len + 1) int64 tensor: a copy, for small data."""
        return self.train_blocks.tensor()

    @property
    def val(self) -> torch.Tensor:
        """Every validation block as one (N_val, seq_len + 1) int64 tensor: a copy, for small data."""
        return self.val_blocks if isinstance(self.val_blocks, torch.Tensor) else self.val_blocks.tensor()


def _tokenizer_ident(tok_cfg: TokenizerConfig | None, tokenizer) -> list:
    if tokenizer is not None:
        return [tokenizer.ident]
    if tok_cfg is None or tok_cfg.kind == "byte":
        return ["byte"]
    if tok_cfg.kind == "bpe":
        return ["bpe", tok_cfg.vocab_size]
    with open(tokenizer_file(tok_cfg.path), "rb") as f:
        return ["pretrained", hashlib.sha256(f.read()).hexdigest()]


def _cache_key(cfg: DataConfig, seed: int, tok_ident: list) -> str:
    if cfg.source == "stdlib":
        ident = [(f, os.path.getsize(f)) for f in stdlib_files(cfg.max_files)]
    elif cfg.source == "text":
        ident = sources.file_ident(cfg.files)
    else:
        ident = [cfg.name, cfg.subset, cfg.split]
    val = sources.file_ident(cfg.val_files) if cfg.val_files else None
    # The split is a function of the seed only when it is drawn (no data.val_files).
    blob = json.dumps([_FORMAT_VERSION, cfg.source, ident, cfg.text_field, cfg.encoding, cfg.seq_len,
                       cfg.val_fraction if val is None else val, seed if val is None else None, tok_ident],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _make_tokenizer(tok_cfg: TokenizerConfig | None, docs, train_idx: list[int], say: Callable[[str], None]):
    """The tokenizer to build the store with: byte, a BPE trained on the training documents only
    (at most BPE_TRAIN_BYTES of them, every k-th document, so its memory does not grow with the
    corpus), or the pretrained file (with the special tokens it lacks added)."""
    if tok_cfg is None or tok_cfg.kind == "byte":
        return ByteTokenizer()
    if tok_cfg.kind == "bpe":
        stride = max(1, -(-docs.nbytes(train_idx) // BPE_TRAIN_BYTES))
        sample = train_idx[::stride]
        say(f"training a byte-level BPE tokenizer (tokenizer.vocab_size={tok_cfg.vocab_size}) on "
            f"{len(sample)} of the {len(train_idx)} training documents")
        return train_bpe(texts_of(docs.batches(sample)), tok_cfg.vocab_size)
    return load_pretrained(tok_cfg.path, say=say)


def _build(cfg: DataConfig, seed: int, out_dir: str, tok_cfg, tokenizer, say) -> None:
    """Load, split by document (or take data.val_files), tokenize + pack, write the store."""
    docs = load_documents(cfg)
    n = len(docs)
    if n == 0:
        raise ConfigError(f"data: the corpus ({cfg.source}) is empty; it has no text to train on.")
    if cfg.val_files:
        val_docs = load_documents(cfg, cfg.val_files, key="data.val_files")
        train_idx, val_idx = list(range(n)), list(range(len(val_docs)))
    else:
        val_docs = docs
        train_idx, val_idx = held_out_documents(n, cfg.val_fraction, seed)
    tokenizer = tokenizer or _make_tokenizer(tok_cfg, docs, train_idx, say)
    tmp = out_dir + f".tmp{os.getpid()}"
    width = cfg.seq_len + 1
    n_train, n_val = write_store(tmp, [docs.batches(train_idx), val_docs.batches(val_idx)],
                                 tokenizer, width, cfg.num_proc, {"num_docs": n, "format": _FORMAT_VERSION})
    if cfg.val_files and n_val == 0:
        raise ConfigError(f"data.val_files hold no block of data.seq_len+1={width} tokens; add text to them "
                          f"or lower data.seq_len.")
    if n_val == 0:
        # One document (or a tiny held-out part): hold out the last blocks instead.
        total = n_train + n_val
        if total < 2:
            raise ConfigError(f"data: the corpus ({cfg.source}) is empty or too small: it needs at least "
                              f"2 blocks of data.seq_len+1={width} tokens; add text or lower data.seq_len.")
        k = max(1, round(total * cfg.val_fraction))
        n_train, n_val = total - k, k
    if n_train == 0:
        raise ConfigError(f"data: the corpus has no training block of data.seq_len+1={width} "
                          f"tokens; add text or lower data.seq_len.")
    finish_store(tmp, out_dir, n_train, n_val)


def _open_tokenizer(store_dir: str, ident: str):
    if ident == "byte":
        return ByteTokenizer()
    return load_tokenizer_json(os.path.join(store_dir, "tokenizer.json"), ident.split(":")[0])


def load_corpus(cfg: DataConfig, seed: int, tok_cfg: TokenizerConfig | None = None, tokenizer=None,
                say: Callable[[str], None] = print) -> Corpus:
    """The tokenized train/validation blocks for `cfg`, built once and cached on disk.

    Args:
        cfg: the data config. seed: fixes the by-document split (unless data.val_files).
        tok_cfg: the tokenizer config (None: byte). tokenizer: an existing tokenizer to use instead
            (e.g. a finished run's, for evaluation on other data). say: prints notes (BPE training,
            special tokens added to a pretrained tokenizer).

    Raises:
        ConfigError: unreadable/missing files, an empty corpus, a bad tokenizer.
    """
    root = os.path.join(os.path.expanduser(cfg.cache_dir), "store")
    os.makedirs(root, exist_ok=True)
    out_dir = os.path.join(root, _cache_key(cfg, seed, _tokenizer_ident(tok_cfg, tokenizer)))
    if not os.path.exists(out_dir):
        try:
            _build(cfg, seed, out_dir, tok_cfg, tokenizer, say)
        finally:  # a failed build leaves no temporary directory behind
            shutil.rmtree(out_dir + f".tmp{os.getpid()}", ignore_errors=True)
    elif tok_cfg is not None and tok_cfg.kind == "pretrained" and tokenizer is None:
        load_pretrained(tok_cfg.path, say=say)  # says again which special tokens were added
    train, val, meta = open_store(out_dir)
    return Corpus(train_blocks=train, val_blocks=val, num_docs=meta["num_docs"], num_tokens=meta["num_tokens"],
                  tokenizer=tokenizer or _open_tokenizer(out_dir, meta["tokenizer"]), store_dir=out_dir)


def blocks_of(corpus, split: str):
    """A corpus's `split` ("train" | "val") blocks without copying them: the memory-mapped
    `StoreBlocks` of a `Corpus`, or the tensor of a corpus that holds tensors (e.g. pairs)."""
    blocks = getattr(corpus, f"{split}_blocks", None)
    return blocks if blocks is not None else getattr(corpus, split)


def corpus_tokenizer(corpus):
    """The tokenizer that made `corpus` (the byte tokenizer when it does not say)."""
    return getattr(corpus, "tokenizer", None) or ByteTokenizer()
