"""The token store: every split's tokens written once to a memory-mapped file, and batches by step.

Layout of a store directory (`<data.cache_dir>/store/<key>/`, built under a temporary name and
renamed when complete, so a reader sees a whole store or none):

    tokens.bin      the packed blocks of both splits, train first: (num_blocks, seq_len + 1) of
                    uint16 (vocabularies up to 65,536 ids) or uint32, row-major
    doc_starts.npy  int64: the token offset in tokens.bin where each document begins (its BOS)
    meta.json       width, dtype, train/val block counts, documents, tokens, tokenizer ident
    tokenizer.json  bpe/pretrained: the tokenizer the tokens were made with

Documents are read and tokenized a few at a time (`sources.READ_DOCS`, optionally in
`data.num_proc` processes), each as BOS + ids + EOS, concatenated and cut into blocks; the tail
left over after every `sources.DOC_BATCH` documents is dropped (so the byte-level blocks equal the
packing of earlier versions exactly). Memory stays bounded by a few documents whatever the corpus.
"""
from __future__ import annotations

import collections
import json
import mmap
import multiprocessing as mp
import os
import shutil
from typing import Iterable, Iterator

import numpy as np
import torch

from trainer.data.sources import DOC_BATCH
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer

_WORKER: dict = {}  # the tokenizer inside a worker process (set by _init_worker)

class StoreBlocks:
    """Rows `[lo, hi)` of a store's (N, width) memory map; indexing returns int64 tensors.

    `blocks[idx]` (idx: int tensor/array/slice) reads only those rows from the page cache: no copy
    of the split is ever made, so memory does not grow with the corpus.
    """

    def __init__(self, mm: np.ndarray, lo: int, hi: int, mapping: mmap.mmap | None = None):
        self.mm, self.lo, self.hi, self.mapping = mm, lo, hi, mapping

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.mm.shape[1])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            rows = self.mm[self.lo + start:self.lo + stop:step]
        else:
            i = np.asarray(idx.numpy() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
            rows = self.mm[self.lo + i]  # (len(idx), width): a gather from the map
        out = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            # Each fault maps a whole page-cache folio (up to MBs with readahead), which would count
            # as this process's RSS and grow with the corpus; unmapping keeps the pages cached.
            self.mapping.madvise(mmap.MADV_DONTNEED)
        return out

    def windows(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """(len(starts), length) int64: `length` consecutive tokens from each token offset in
        `starts`, counted in the split's rows read end to end (a window may run on into the next
        row). Reads only those tokens from the map."""
        flat = self.mm.reshape(-1)  # a view of the map, no copy
        idx = self.lo * self.mm.shape[1] + np.asarray(starts, np.int64)[:, None] + np.arange(length)
        out = torch.from_numpy(np.asarray(flat[idx], dtype=np.int64))
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)  # as __getitem__: keep RSS flat
        return out

    def tensor(self) -> torch.Tensor:
        """All rows as one (N, width) int64 tensor (a copy: for small corpora and tests)."""
        return self[0:len(self)]

class BatchStream:
    """Deterministic infinite stream of training windows, a pure function of (seed, step).

    Fixed blocks (default): sample i of the run is block `perm_e[i % N]` with `perm_e` a
    permutation seeded by (seed, epoch e = i // N). `random_offsets=True`: nanoGPT's sampling
    (`get_batch` in its train.py): each of step s's windows starts at a token offset drawn
    uniformly from the split's tokens (read end to end) by a generator seeded by (seed, s), so
    the run sees ~width times more distinct windows than there are blocks; nothing is copied
    (`StoreBlocks.windows` gathers from the map). A window may span two stored rows, so it may
    join text across a dropped packing tail (`_Packer`), as a document boundary does.

    Either way resume needs only the step number, and every rank sees the same global batch (it
    takes its own slice) whatever the number of processes. `blocks` is a (N, width) tensor or the
    memory-mapped `StoreBlocks`.
    """

    def __init__(self, blocks, batch_size: int, seed: int, random_offsets: bool = False):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.random_offsets = random_offsets
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._perm

    def offsets(self, step: int) -> np.ndarray:
        """The token offsets of step `step`'s windows (random_offsets): (batch_size,) int64 in
        [0, N * width - width], from a generator seeded by (seed, step) alone."""
        n, width = self.blocks.shape
        rng = np.random.default_rng([self.seed, step, 0x0FF5E7])  # the tag keeps it apart from other streams
        return rng.integers(0, n * width - width + 1, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> torch.Tensor:
        """The global batch for optimizer step `step` (0-based): (batch_size, seq_len + 1) int64."""
        if self.random_offsets:
            starts = self.offsets(step)
            width = self.blocks.shape[1]
            if isinstance(self.blocks, StoreBlocks):
                return self.blocks.windows(starts, width)
            flat = self.blocks.reshape(-1)  # (N * width,): a view of a contiguous tensor
            return flat[torch.from_numpy(starts)[:, None] + torch.arange(width)]
        n = len(self.blocks)
        idx = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        rows = torch.empty_like(idx)
        for epoch in torch.unique(idx // n).tolist():  # at most two epochs inside one batch
            sel = idx // n == epoch
            rows[sel] = self._permutation(epoch)[idx[sel] % n]
        return self.blocks[rows]

def _encode(docs: list[bytes], tokenizer, dtype) -> list[np.ndarray | None]:
    """Ids of each document in the store's dtype (None for an empty document, which is skipped)."""
    kept = [d for d in docs if d]
    encoded = iter(tokenizer.encode_docs(kept)) if kept else iter(())
    return [next(encoded).astype(dtype) if d else None for d in docs]

def _init_worker(kind: str, tok_json: str | None) -> None:

    if tok_json is None:
        _WORKER["tok"] = ByteTokenizer()
    else:
        from tokenizers import Tokenizer

        _WORKER["tok"] = HFTokenizer(Tokenizer.from_str(tok_json), kind)

def _encode_in_worker(docs: list[bytes], dtype) -> list[np.ndarray | None]:
    return _encode(docs, _WORKER["tok"], dtype)

def _encoded(chunks: Iterable[list[bytes]], tokenizer, dtype, num_proc: int) -> Iterator[np.ndarray | None]:
    """Each document's ids, in order; with num_proc > 1 tokenized in a pool that keeps at most
    2 x num_proc chunks in flight (so reading never runs ahead of writing by more than that)."""
    if num_proc <= 1:
        for docs in chunks:
            yield from _encode(docs, tokenizer, dtype)
        return
    tok_json = None if tokenizer.kind == "byte" else tokenizer.json
    with mp.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.kind, tok_json)) as pool:
        pending: collections.deque = collections.deque()
        for docs in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (docs, dtype)))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

class _Packer:
    """Appends BOS + ids + EOS per document to `f` in whole blocks; the remainder carries over to
    the next document until `DOC_BATCH` documents have passed, where it is dropped."""

    def __init__(self, f, width: int, bos: int, eos: int, dtype):
        self.f, self.width, self.dtype = f, width, dtype
        self.bos, self.eos = np.array([bos], dtype), np.array([eos], dtype)
        self.written, self.carry, self.docs_in_batch = 0, np.zeros(0, dtype), 0
        self.starts: list[int] = []
        self._batch_starts: list[int] = []

    def add(self, ids: np.ndarray | None) -> None:
        if ids is not None:
            self._batch_starts.append(self.written + len(self.carry))
            buf = np.concatenate([self.carry, self.bos, ids, self.eos])
            keep = len(buf) // self.width * self.width
            buf[:keep].tofile(self.f)
            self.written += keep
            self.carry = buf[keep:]
        self.docs_in_batch += 1
        if self.docs_in_batch == DOC_BATCH:
            self.end_batch()

    def end_batch(self) -> None:
        """Drop the partial block; documents that began in it start at the end of what was written."""
        self.starts += [min(s, self.written) for s in self._batch_starts]
        self._batch_starts, self.carry, self.docs_in_batch = [], self.carry[:0], 0

def write_store(out_dir: str, splits: list[Iterable[list[bytes]]], tokenizer, width: int, num_proc: int,
                meta: dict) -> list[int]:
    """Tokenize and pack each split's documents (given in chunks) into `out_dir` (tokens.bin,
    doc_starts.npy, meta.json, tokenizer.json); returns the number of blocks of each split.

    Memory is bounded by a few chunks of documents: blocks are appended to tokens.bin as they fill.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    counts = []
    with open(os.path.join(out_dir, "tokens.bin"), "wb") as f:
        packer = _Packer(f, width, tokenizer.bos_id, tokenizer.eos_id, dtype)
        for chunks in splits:
            before = packer.written
            for ids in _encoded(chunks, tokenizer, dtype, num_proc):
                packer.add(ids)
            packer.end_batch()  # a split's last partial batch ends with it
            counts.append((packer.written - before) // width)
    np.save(os.path.join(out_dir, "doc_starts.npy"), np.asarray(packer.starts, np.int64))
    if tokenizer.kind != "byte":
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer.json)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({**meta, "width": width, "dtype": np.dtype(dtype).name, "num_tokens": packer.written,
                   "tokenizer": tokenizer.ident, "split_blocks": counts}, f)
    return counts

def finish_store(tmp_dir: str, out_dir: str, n_train: int, n_val: int) -> None:
    """Record the final split (train blocks first) and move the store into place atomically."""
    path = os.path.join(tmp_dir, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    meta.update(n_train=n_train, n_val=n_val)
    with open(path, "w") as f:
        json.dump(meta, f)
    if os.path.exists(out_dir):  # another process finished first
        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)

def open_store(store_dir: str) -> tuple[StoreBlocks, StoreBlocks, dict]:
    """(train, val, meta) of a finished store, memory-mapped read-only (nothing is read yet)."""
    with open(os.path.join(store_dir, "meta.json")) as f:
        meta = json.load(f)
    width, n_train, n_val = meta["width"], meta["n_train"], meta["n_val"]
    n = n_train + n_val
    if n == 0:
        mm = np.zeros((0, width), meta["dtype"])
    else:
        mm = np.memmap(os.path.join(store_dir, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(n, width))
    mapping = getattr(mm, "_mmap", None)
    return StoreBlocks(mm, 0, n_train, mapping), StoreBlocks(mm, n_train, n, mapping), meta
