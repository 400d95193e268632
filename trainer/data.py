"""Corpus loading through `datasets`, byte-level tokenization, packing, and the batch stream.

The packed corpus is cached on disk (`data.cache_dir`, keyed by the files and settings), so a
second run starts in a moment. Training batches are gathered from a tensor already in memory:
no per-step Python or tokenizer work.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig

# Byte-level vocabulary: ids 0..255 are bytes, then the special ids the objectives need.
PAD, BOS, EOS, MASK = 256, 257, 258, 259
SENTINEL0 = 260  # span corruption: sentinel i is SENTINEL0 + i
VOCAB_SIZE = 384  # 124 sentinels; a multiple of 64 keeps the embedding/head matmuls aligned
NUM_SENTINELS = VOCAB_SIZE - SENTINEL0
_FORMAT_VERSION = 1  # bump when tokenization or packing changes (invalidates caches)
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


@dataclass
class Corpus:
    """Packed token blocks: each row is `seq_len + 1` tokens (one extra for next-token targets)."""

    train: torch.Tensor  # (N_train, seq_len + 1) int64
    val: torch.Tensor  # (N_val, seq_len + 1) int64
    num_docs: int
    num_tokens: int


@functools.lru_cache(maxsize=4)
def _stdlib_all() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep, os.sep + "tests" + os.sep,
            os.sep + "idlelib" + os.sep)
    return tuple(sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                        if not any(s in f[len(root):] for s in skip)))


def stdlib_files(max_files: int | None = None) -> list[str]:
    """The running interpreter's standard-library `.py` files (tests and site-packages excluded)."""
    files = list(_stdlib_all())
    return files[:max_files] if max_files else files


def _tokenize_and_pack(batch: dict, seq_len: int, field: str) -> dict:
    """`datasets.map` function: documents -> rows of `seq_len + 1` tokens.

    Each document is BOS + utf-8 bytes + EOS; documents are concatenated and cut into blocks
    (the tail that does not fill a block is dropped).
    """
    parts = []
    for text in batch[field]:
        if text:
            parts += [np.array([BOS], np.int16), np.frombuffer(text.encode("utf-8", "replace"), np.uint8).astype(np.int16),
                      np.array([EOS], np.int16)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    n = len(flat) // (seq_len + 1)
    return {"input_ids": flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)}


def _load_documents(cfg: DataConfig):
    """The raw documents as a `datasets.Dataset` with a text column."""
    import datasets

    datasets.disable_progress_bars()
    hf_cache = os.path.join(os.path.expanduser(cfg.cache_dir), "hf")
    if cfg.source == "stdlib":
        files = stdlib_files(cfg.max_files)
        texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
        return datasets.Dataset.from_dict({"path": files, cfg.text_field: texts})
    if cfg.source == "text":
        files = [os.path.expanduser(f) for f in cfg.files]
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"data.files: no such file {f!r}.")
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
            raise ConfigError(f"data.files must all share one of the extensions "
                              f"{', '.join(sorted(_BUILDERS))}; got {', '.join(sorted(exts))}.")
        builder = _BUILDERS[exts.pop()]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **kwargs)
        except Exception as e:  # malformed json/parquet: name the files, not a traceback
            raise ConfigError(f"data.files could not be read as {builder}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ") + ".") from e
    else:
        try:
            ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, cache_dir=hf_cache)
        except Exception as e:
            raise ConfigError(f"data.name={cfg.name!r} could not be loaded from the Hugging Face hub "
                              f"(offline, or no such dataset/split?): {type(e).__name__}.") from e
    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of the data; "
                          f"columns: {', '.join(ds.column_names)}.")
    return ds


def _cache_key(cfg: DataConfig, seed: int) -> str:
    if cfg.source == "stdlib":
        ident = [(f, os.path.getsize(f)) for f in stdlib_files(cfg.max_files)]
    elif cfg.source == "text":
        ident = [(os.path.abspath(os.path.expanduser(f)), os.path.getsize(f), os.path.getmtime(f))
                 for f in cfg.files if os.path.isfile(os.path.expanduser(f))]
    else:
        ident = [cfg.name, cfg.subset, cfg.split]
    blob = json.dumps([_FORMAT_VERSION, cfg.source, ident, cfg.text_field, cfg.seq_len,
                       cfg.val_fraction, seed], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(cfg: DataConfig, seed: int, out_dir: str) -> None:
    """Load, split by document (deterministic from the seed), tokenize+pack, save to `out_dir`."""
    import datasets

    docs = _load_documents(cfg)
    docs = docs.select_columns([cfg.text_field])
    n = len(docs)
    if n == 0:
        raise ConfigError(f"data: the corpus ({cfg.source}) is empty; it has no text to train on.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * cfg.val_fraction)) if n >= 2 else 0
    split = {"train": docs.select(sorted(order[n_val:])), "val": docs.select(sorted(order[:n_val]))}
    packed = {}
    for name, part in split.items():
        packed[name] = part.map(_tokenize_and_pack, batched=True, batch_size=256,
                                remove_columns=part.column_names,
                                fn_kwargs={"seq_len": cfg.seq_len, "field": cfg.text_field})
    if n_val == 0 or len(packed["val"]) == 0:
        # One document (or a tiny held-out part): hold out the last blocks instead.
        everything = datasets.concatenate_datasets([packed["train"], packed["val"]])
        k = max(1, round(len(everything) * cfg.val_fraction))
        if len(everything) < 2:
            raise ConfigError(f"data: the corpus ({cfg.source}) is empty or too small: it needs at least "
                              f"2 blocks of data.seq_len+1={cfg.seq_len + 1} tokens; add text or lower data.seq_len.")
        packed = {"train": everything.select(range(len(everything) - k)),
                  "val": everything.select(range(len(everything) - k, len(everything)))}
    if len(packed["train"]) == 0:
        raise ConfigError(f"data: the corpus has no training block of data.seq_len+1={cfg.seq_len + 1} "
                          f"tokens; add text or lower data.seq_len.")
    dd = datasets.DatasetDict(packed)
    tmp = out_dir + f".tmp{os.getpid()}"
    dd.save_to_disk(tmp)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"num_docs": n}, f)
    if os.path.exists(out_dir):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _blocks(ds, width: int) -> torch.Tensor:
    """The packed rows as one (N, width) int64 tensor, read straight from Arrow (no per-row Python)."""
    column = ds.data.column("input_ids")
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return torch.from_numpy(flat.astype(np.int64).reshape(-1, width))


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    """The packed train/validation blocks for `cfg`, built once and cached on disk."""
    import datasets

    root = os.path.join(os.path.expanduser(cfg.cache_dir), "corpus")
    os.makedirs(root, exist_ok=True)
    out_dir = os.path.join(root, _cache_key(cfg, seed))
    if not os.path.exists(out_dir):
        _build(cfg, seed, out_dir)
    dd = datasets.load_from_disk(out_dir)
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    train, val = (_blocks(dd[s], cfg.seq_len + 1) for s in ("train", "val"))
    return Corpus(train=train, val=val, num_docs=meta["num_docs"], num_tokens=int(train.numel() + val.numel()))


class BatchStream:
    """Deterministic infinite stream of training blocks: sample i of the run is block
    `perm_e[i % N]` with `perm_e` a permutation seeded by (seed, epoch e = i // N).

    The position is a pure function of the step, so resume needs only the step number, and every
    rank sees the same global batch (it takes its own slice).
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """The global batch for optimizer step `step` (0-based): (batch_size, seq_len + 1)."""
        n = len(self.blocks)
        idx = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        rows = torch.empty_like(idx)
        for epoch in torch.unique(idx // n).tolist():  # at most two epochs inside one batch
            sel = idx // n == epoch
            rows[sel] = self._permutation(epoch)[idx[sel] % n]
        return self.blocks[rows]


def eval_batches(blocks: torch.Tensor, batch_size: int, num_batches: int) -> Iterator[torch.Tensor]:
    """The first `num_batches` validation batches, always the same ones (comparable across steps)."""
    for i in range(min(num_batches, max(1, len(blocks) // batch_size))):
        chunk = blocks[i * batch_size:(i + 1) * batch_size]
        if len(chunk):
            yield chunk
