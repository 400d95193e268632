"""Where documents come from: the stdlib corpus, your files (.txt/.md byte for byte, .jsonl,
.parquet through `datasets`) and the Hugging Face hub, as a `Docs` source that yields documents
as bytes in bounded batches (a file is read only when its batch is reached).
"""
from __future__ import annotations

import codecs
import functools
import os
import shutil
import sysconfig
import tempfile
from typing import Iterator, Sequence

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig

_RAW_EXTS = (".md", ".text", ".txt")  # read as raw bytes, one document per file
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # read by `datasets`
_READ_CHUNK = 1 << 24  # .json/.jsonl are checked (and transcoded) in chunks, not whole in memory
SOURCES = ("stdlib", "text", "hub", "pairs")  # data=<source>
DOC_BATCH = 256  # the packer drops the partial block after every this many documents
READ_DOCS = 16  # documents read (and tokenized) at a time: memory is bounded by a few of these


@functools.lru_cache(maxsize=4)
def _stdlib_all() -> tuple[str, ...]:
    """Every `.py` file under the stdlib root, sorted; directories named test, tests, idlelib or
    site-packages are not entered, nor hidden ones (what `glob("**/*.py")` would list minus those,
    in a fraction of its time: the skipped trees are never walked)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idlelib"}
    found = []
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        found += [os.path.join(here, f) for f in files if f.endswith(".py") and not f.startswith(".")]
    return tuple(sorted(found))


def stdlib_files(max_files: int | None = None) -> list[str]:
    """The running interpreter's standard-library `.py` files (tests and site-packages excluded)."""
    files = list(_stdlib_all())
    return files[:max_files] if max_files else files


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


class FileDocs:
    """Documents that are whole files, read (and transcoded) only when their batch is reached."""

    def __init__(self, files: Sequence[str], encoding: str | None, where: str):
        self.files, self.encoding, self.where = list(files), encoding, where

    def __len__(self) -> int:
        return len(self.files)

    def nbytes(self, indices: Sequence[int]) -> int:
        """Bytes on disk of the documents at `indices`."""
        return sum(os.path.getsize(self.files[i]) for i in indices)

    def batches(self, indices: Sequence[int], size: int = READ_DOCS) -> Iterator[list[bytes]]:
        """The documents at `indices`, in order, as lists of at most `size` byte strings."""
        for start in range(0, len(indices), size):
            out = []
            for i in indices[start:start + size]:
                with open(self.files[i], "rb") as fh:
                    out.append(_transcode(fh.read(), self.encoding, f"{self.where} {self.files[i]}"))
            yield out


class ArrowDocs:
    """Documents in a column of bytes of a `datasets.Dataset` (Arrow, memory-mapped from its cache)."""

    def __init__(self, ds, field: str):
        self.ds, self.field = ds, field

    def __len__(self) -> int:
        return len(self.ds)

    def nbytes(self, indices: Sequence[int]) -> int:
        """About how many bytes the documents at `indices` hold (the table's size, pro rata)."""
        return self.ds.data.nbytes * len(indices) // max(1, len(self.ds))

    def batches(self, indices: Sequence[int], size: int = READ_DOCS) -> Iterator[list[bytes]]:
        """The documents at `indices`, in order, as lists of at most `size` byte strings."""
        part = self.ds.select_columns([self.field]).select(indices)
        for batch in part.iter(batch_size=size):
            yield [d for d in batch[self.field]]


def _json_inputs(files: list[str], encoding: str | None, tmp_dir: str, key: str = "data.files") -> list[str]:
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
                    raise _decode_error(f"{key}: {f}", codec, offset - pending + e.start,
                                        e.object[e.start:e.end]) from None
                if copy:
                    dst.write(_utf8(text, f"{key}: {f}"))
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


def _check_files(files: list[str], key: str) -> str:
    """The one extension `files` share (ConfigError naming `key` otherwise, or a missing file)."""
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"{key}: no such file {f!r}.")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    valid = sorted((*_RAW_EXTS, *_BUILDERS))
    if len(exts) != 1 or next(iter(exts)) not in valid:
        raise ConfigError(f"{key} must all share one of the extensions "
                          f"{', '.join(valid)}; got {', '.join(sorted(exts)) or 'no file'}.")
    return exts.pop()


def check_files(files: Sequence[str], key: str) -> None:
    """Raise a one-sentence ConfigError naming `key` when a file is missing or the extensions differ."""
    _check_files([os.path.expanduser(str(f)) for f in files], key)


def _load_files(cfg: DataConfig, hf_cache: str, files: Sequence[str], key: str = "data.files"):
    """data=text: .txt/.md/.text read byte for byte (one document per file); .json/.jsonl/.parquet
    through the `datasets` builders."""
    files = [os.path.expanduser(str(f)) for f in files]
    ext = _check_files(files, key)
    if ext in _RAW_EXTS:
        if cfg.text_field != "text":
            raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of the data; columns: text.")
        return FileDocs(files, cfg.encoding, f"{key}:")
    import datasets  # imported only where needed: plain files are read without it

    datasets.disable_progress_bars()
    builder = _BUILDERS[ext]
    os.makedirs(hf_cache, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="utf8-", dir=hf_cache)  # a fresh path: the builder caches by path
    try:
        inputs = _json_inputs(files, cfg.encoding, tmp_dir, key) if builder == "json" else files
        try:
            ds = datasets.load_dataset(builder, data_files=inputs, split="train", cache_dir=hf_cache)
        except Exception as e:  # malformed json/parquet: name the files, not a traceback
            raise ConfigError(f"{key} could not be read as {builder}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ") + ".") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _check_field(ds, cfg.text_field)
    return ArrowDocs(_as_bytes(ds, cfg.text_field, cfg.encoding, key), cfg.text_field)


def load_documents(cfg: DataConfig, files: Sequence[str] | None = None, key: str = "data.files"):
    """The raw documents of `cfg` (or of `files`, e.g. data.val_files) as a `FileDocs`/`ArrowDocs`
    source of bytes: exactly the bytes of each file (or, with `data.encoding`, the file decoded
    with it, UTF-8 encoded).

    Raises:
        ConfigError: a missing/unreadable file, a bad codec or field, the hub unreachable.
    """
    _check_codec(cfg.encoding)
    hf_cache = os.path.join(os.path.expanduser(cfg.cache_dir), "hf")
    if files is not None:
        return _load_files(cfg, hf_cache, files, key)
    if cfg.source == "stdlib":
        return FileDocs(stdlib_files(cfg.max_files), cfg.encoding, "data=stdlib:")
    if cfg.source == "text":
        return _load_files(cfg, hf_cache, cfg.files)
    import datasets  # imported only where needed: plain files are read without it

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, cache_dir=hf_cache)
    except Exception as e:
        raise ConfigError(f"data.name={cfg.name!r} could not be loaded from the Hugging Face hub "
                          f"(offline, or no such dataset/split?): {type(e).__name__}.") from e
    _check_field(ds, cfg.text_field)
    return ArrowDocs(_as_bytes(ds, cfg.text_field, cfg.encoding, f"data.name={cfg.name!r}"), cfg.text_field)


def file_ident(files: Sequence[str]) -> list:
    """What identifies `files` for a cache key: absolute path, size and mtime of each."""
    out = []
    for f in files:
        f = os.path.abspath(os.path.expanduser(str(f)))
        if os.path.isfile(f):
            out.append((f, os.path.getsize(f), os.path.getmtime(f)))
    return out
