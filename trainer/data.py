"""Corpus loading through `datasets`, byte-level tokenization, packing, and the batch stream.

The packed corpus is cached on disk (`data.cache_dir`, keyed by the files and settings), so a
second run starts in a moment. Training batches are gathered from a tensor already in memory:
no per-step Python or tokenizer work.
"""
from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.heldout import held_out_documents

# Byte-level vocabulary: ids 0..255 are bytes, then the special ids the objectives need.
PAD, BOS, EOS, MASK = 256, 257, 258, 259
SENTINEL0 = 260  # span corruption: sentinel i is SENTINEL0 + i
VOCAB_SIZE = 384  # 124 sentinels; a multiple of 64 keeps the embedding/head matmuls aligned
NUM_SENTINELS = VOCAB_SIZE - SENTINEL0
_FORMAT_VERSION = 2  # bump when tokenization or packing changes (invalidates caches)
_RAW_EXTS = (".md", ".text", ".txt")  # read as raw bytes, one document per file
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # read by `datasets`
_READ_CHUNK = 1 << 24  # .json/.jsonl are checked (and transcoded) in chunks, not whole in memory


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
    """`datasets.map` function: documents (bytes, exactly as the model sees them) -> rows of
    `seq_len + 1` tokens.

    Each document is BOS + its bytes + EOS; documents are concatenated and cut into blocks
    (the tail that does not fill a block is dropped). Empty documents are skipped.
    """
    parts = []
    for doc in batch[field]:
        if doc:
            assert isinstance(doc, bytes), type(doc)  # _load_documents gives bytes, never str
            parts += [np.array([BOS], np.int16), np.frombuffer(doc, np.uint8).astype(np.int16),
                      np.array([EOS], np.int16)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    n = len(flat) // (seq_len + 1)
    return {"input_ids": flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)}


def _check_codec(encoding: str | None) -> None:
    if encoding is None:
        return
    try:
        text = getattr(codecs.lookup(encoding), "_is_text_encoding", True)  # not e.g. "hex", "zlib"
    except LookupError:
        text = False
    if not text:
        raise ConfigError(f"data.encoding={encoding!r} is not a text codec Python knows; use a name such as "
                          f"utf-8, latin-1 or cp1252, or null to take text files byte for byte.")


def _decode_error(where: str, encoding: str, offset: int, bad: bytes) -> ConfigError:
    what = "is not valid UTF-8" if encoding == "utf-8" else f"cannot be decoded with data.encoding={encoding}"
    return ConfigError(f"{where} {what} at byte offset {offset} (byte {' '.join(f'0x{b:02x}' for b in bad[:4])}); "
                       f"set data.encoding=<codec> to its encoding (e.g. data.encoding=latin-1).")


def _decoded(raw: bytes, encoding: str, where: str) -> str:
    """`raw` decoded with `encoding`; a failure names `where` and the byte offset."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise _decode_error(where, encoding, e.start, e.object[e.start:e.end]) from None


def _utf8(text: str, where: str) -> bytes:
    """`text` as UTF-8, strictly (a lone surrogate is refused, never replaced)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{where} holds a lone surrogate at character {e.start}, which UTF-8 cannot "
                          f"encode; set data.encoding to the data's real encoding.") from None


def _transcode(raw: bytes, encoding: str | None, where: str) -> bytes:
    """The bytes the model sees: `raw` as is (no encoding), or decoded with `encoding` and UTF-8 encoded."""
    return raw if encoding is None else _utf8(_decoded(raw, encoding, where), where)


def _read_files(files: list[str], encoding: str | None, where: str) -> list[bytes]:
    """Each file's bytes, exactly as on disk (or transcoded to UTF-8 from `encoding`)."""
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            docs.append(_transcode(fh.read(), encoding, f"{where} {f}"))
    return docs


def _json_inputs(files: list[str], encoding: str | None, tmp_dir: str) -> list[str]:
    """The .json/.jsonl files for the json builder (which parses UTF-8): each one streamed through
    its codec (UTF-8 unless `data.encoding`; a failure names the byte offset), and transcoded to a
    UTF-8 copy in `tmp_dir` when the codec is another one."""
    codec = encoding or "utf-8"
    is_utf8 = codecs.lookup(codec).name == "utf-8"
    out = []
    for i, f in enumerate(files):
        copy = None if is_utf8 else os.path.join(tmp_dir, f"{i}{os.path.splitext(f)[1]}")
        decoder, offset = codecs.getincrementaldecoder(codec)(), 0
        with open(f, "rb") as src, open(copy or os.devnull, "wb") as dst:
            while True:
                chunk = src.read(_READ_CHUNK)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise _decode_error(f"data.files: {f}", codec, offset - pending + e.start,
                                        e.object[e.start:e.end]) from None
                if copy:
                    dst.write(_utf8(text, f"data.files: {f}"))
                if not chunk:
                    break
                offset += len(chunk)
        out.append(copy or f)
    return out


def _as_bytes(ds, field: str, encoding: str | None, where: str):
    """`ds` with column `field` as bytes exactly as given: a string column by its UTF-8 bytes
    (Arrow strings are UTF-8, so this is a cast), a binary column as is or transcoded from `encoding`."""
    import datasets

    feature = ds.features[field]
    dtype = feature.dtype if isinstance(feature, datasets.Value) else None
    if dtype in ("string", "large_string"):
        return ds.cast_column(field, datasets.Value(dtype.replace("string", "binary")))
    if dtype in ("binary", "large_binary"):
        if encoding is None:
            return ds

        def transcode(batch: dict, idx: list[int]) -> dict:
            return {field: [None if b is None else _transcode(b, encoding, f"{where}: row {i} of column {field!r}")
                            for b, i in zip(batch[field], idx)]}
        return ds.map(transcode, batched=True, with_indices=True)
    raise ConfigError(f"data.text_field={field!r} is a column of {feature}, not text; columns: "
                      f"{', '.join(ds.column_names)}.")


def _check_field(ds, field: str) -> None:
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={field!r} is not a column of the data; "
                          f"columns: {', '.join(ds.column_names)}.")


def _load_files(cfg: DataConfig, hf_cache: str):
    """data=text: .txt/.md/.text read byte for byte (one document per file); .json/.jsonl/.parquet
    through the `datasets` builders."""
    import datasets

    files = [os.path.expanduser(f) for f in cfg.files]
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"data.files: no such file {f!r}.")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    valid = sorted((*_RAW_EXTS, *_BUILDERS))
    if len(exts) != 1 or next(iter(exts)) not in valid:
        raise ConfigError(f"data.files must all share one of the extensions "
                          f"{', '.join(valid)}; got {', '.join(sorted(exts))}.")
    ext = exts.pop()
    if ext in _RAW_EXTS:
        ds = datasets.Dataset.from_dict({"text": _read_files(files, cfg.encoding, "data.files:")},
                                        features=datasets.Features({"text": datasets.Value("large_binary")}))
        _check_field(ds, cfg.text_field)
        return ds
    builder = _BUILDERS[ext]
    os.makedirs(hf_cache, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="utf8-", dir=hf_cache)  # a fresh path: the builder caches by path
    try:
        inputs = _json_inputs(files, cfg.encoding, tmp_dir) if builder == "json" else files
        try:
            ds = datasets.load_dataset(builder, data_files=inputs, split="train", cache_dir=hf_cache)
        except Exception as e:  # malformed json/parquet: name the files, not a traceback
            raise ConfigError(f"data.files could not be read as {builder}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ") + ".") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _check_field(ds, cfg.text_field)
    return _as_bytes(ds, cfg.text_field, cfg.encoding, "data.files")


def _load_documents(cfg: DataConfig):
    """The raw documents as a `datasets.Dataset` whose `cfg.text_field` column holds bytes: exactly
    the bytes of each file (or, with `data.encoding`, the file decoded with it, UTF-8 encoded)."""
    import datasets

    datasets.disable_progress_bars()
    _check_codec(cfg.encoding)
    hf_cache = os.path.join(os.path.expanduser(cfg.cache_dir), "hf")
    if cfg.source == "stdlib":
        files = stdlib_files(cfg.max_files)
        return datasets.Dataset.from_dict(
            {"path": files, cfg.text_field: _read_files(files, cfg.encoding, "data=stdlib:")},
            features=datasets.Features({"path": datasets.Value("string"),
                                        cfg.text_field: datasets.Value("large_binary")}))
    if cfg.source == "text":
        return _load_files(cfg, hf_cache)
    try:
        ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, cache_dir=hf_cache)
    except Exception as e:
        raise ConfigError(f"data.name={cfg.name!r} could not be loaded from the Hugging Face hub "
                          f"(offline, or no such dataset/split?): {type(e).__name__}.") from e
    _check_field(ds, cfg.text_field)
    return _as_bytes(ds, cfg.text_field, cfg.encoding, f"data.name={cfg.name!r}")


def _cache_key(cfg: DataConfig, seed: int) -> str:
    if cfg.source == "stdlib":
        ident = [(f, os.path.getsize(f)) for f in stdlib_files(cfg.max_files)]
    elif cfg.source == "text":
        ident = [(os.path.abspath(os.path.expanduser(f)), os.path.getsize(f), os.path.getmtime(f))
                 for f in cfg.files if os.path.isfile(os.path.expanduser(f))]
    else:
        ident = [cfg.name, cfg.subset, cfg.split]
    blob = json.dumps([_FORMAT_VERSION, cfg.source, ident, cfg.text_field, cfg.encoding, cfg.seq_len,
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
    train_idx, val_idx = held_out_documents(n, cfg.val_fraction, seed)
    n_val = len(val_idx)
    split = {"train": docs.select(train_idx), "val": docs.select(val_idx)}
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
