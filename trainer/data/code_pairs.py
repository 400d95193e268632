"""Retrieval (query, document) pairs: docstring -> code from the standard library, or the user's .jsonl.

The embedded task (no download): every function, async function and class of the standard library
that has a docstring gives one pair. The query is the docstring, cleaned as `inspect.cleandoc` does;
the document is the definition's source (decorators included, dedented) with its own docstring and
every nested docstring cut out, so no query can be found verbatim in any document. A docstring that
is a body's only statement becomes `...`, which keeps the document valid Python.

Pairs are held out by file with `trainer.data.heldout.held_out_documents` over `stdlib_files(max_files)`,
the same call the LM corpus makes, so a file held out from one is held out from the other.
Built pairs are cached as JSON under `<data.cache_dir>/pairs/<key>/pairs.json`.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sysconfig
import textwrap
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig
from trainer.data.heldout import held_out_documents
from trainer.data.sources import stdlib_files

_FORMAT_VERSION = 1  # bump when extraction, filtering or the cache layout changes
MIN_QUERY_CHARS = 20  # shorter docstrings ("Return x.") describe too little to retrieve by
MIN_QUERY_WORDS = 3
MIN_LEAK_CHARS = 40  # a query line this long found in its document makes the pair trivial
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass
class PairSet:
    """Aligned lists: `documents[i]` is the one relevant document of `queries[i]` (UTF-8 bytes)."""

    queries: list[bytes]
    documents: list[bytes]
    sources: list[str]  # "json/decoder.py:JSONDecoder.decode" (stdlib) or "<file>:<line>" (jsonl)

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class Pairs:
    """Training and held-out pairs, plus `data.corpus_files` documents (searched, never queried)."""

    train: PairSet
    val: PairSet
    extra_documents: list[bytes]


def _docstring(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _char_col(line: str, byte_col: int) -> int:
    """ast column offsets count UTF-8 bytes; this is the same position in characters."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", "ignore"))


def _document(node: ast.AST, lines: list[str]) -> str:
    """`node`'s source lines with its docstring and every nested def/class docstring cut out."""
    first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    seg = lines[first - 1:node.end_lineno]
    cuts = []
    for inner in ast.walk(node):
        doc = _docstring(inner) if isinstance(inner, _DEFS) else None
        if doc is not None:
            cuts.append((doc, "..." if len(inner.body) == 1 else ""))
    # Cut from the bottom up, so the line numbers of the cuts still to come stay valid.
    for doc, filler in sorted(cuts, key=lambda c: (c[0].lineno, c[0].col_offset), reverse=True):
        l0, l1 = doc.lineno - first, doc.end_lineno - first
        head = seg[l0][:_char_col(seg[l0], doc.col_offset)]
        tail = seg[l1][_char_col(seg[l1], doc.end_col_offset):]
        if not filler and tail.lstrip().startswith(";"):  # `"""doc"""; x = 1` -> `x = 1`
            tail = tail.lstrip()[1:].lstrip()
        joined = head + filler + tail
        seg[l0:l1 + 1] = [joined] if joined.strip() else []
    return textwrap.dedent("\n".join(seg)).strip("\n") + "\n"


def _has_code(node: ast.AST) -> bool:
    """Something besides the docstring, `pass` and `...` (a stub describes nothing retrievable)."""
    for stmt in node.body[1:]:
        if not (isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))):
            return True
    return False


def _leaks(query: str, document: str) -> bool:
    lines = [ln.strip() for ln in query.splitlines()]
    return query in document or any(len(ln) >= MIN_LEAK_CHARS and ln in document for ln in lines)


def _file_pairs(path: str) -> list[tuple[str, str, str]]:
    """(query, document, qualified name) of each documented def/class of one file, in source order;
    [] for a file that cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode(tokenize.detect_encoding(io.BytesIO(raw).readline)[0])
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # ast counts lines the same way
        with warnings.catch_warnings():  # e.g. invalid escape sequences in old code
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (OSError, SyntaxError, ValueError):  # ValueError covers decoding errors and NUL bytes
        return []
    lines = text.split("\n")  # not splitlines(): ast does not break lines at form feeds
    out: list[tuple[str, str, str]] = []

    def visit(parent: ast.AST, prefix: str) -> None:
        for node in ast.iter_child_nodes(parent):
            if not isinstance(node, _DEFS):
                visit(node, prefix)  # defs inside if/try/with blocks
                continue
            name = prefix + node.name
            query = (ast.get_docstring(node, clean=True) or "").strip()
            if len(query) >= MIN_QUERY_CHARS and len(query.split()) >= MIN_QUERY_WORDS and _has_code(node):
                document = _document(node, lines)
                if not _leaks(query, document):
                    out.append((query, document, name))
            visit(node, name + ".")

    visit(tree, "")
    return out


def _relative(path: str) -> str:
    root = sysconfig.get_paths()["stdlib"]
    rel = os.path.relpath(path, root) if os.path.abspath(path).startswith(root + os.sep) else path
    return rel.replace(os.sep, "/")


def _indexed_pairs(files: list[str]) -> list[tuple[int, str, str, str]]:
    """(file index, query, document, source) over `files`, deduplicated.

    A query that occurs more than once (compared case- and whitespace-insensitively) is dropped
    everywhere: such docstrings are generic ("Return repr(self).") and would have several right
    answers but only one labelled positive; dropping all copies also means no query is shared by a
    training and a held-out file. A document identical to an earlier one keeps only its first pair.
    """
    rows = [(i, q, d, f"{_relative(f)}:{name}") for i, f in enumerate(files) for q, d, name in _file_pairs(f)]
    key = lambda q: " ".join(q.lower().split())  # noqa: E731
    counts = Counter(key(r[1]) for r in rows)
    seen: set[str] = set()
    out = []
    for r in rows:
        if counts[key(r[1])] == 1 and r[2] not in seen:
            seen.add(r[2])
            out.append(r)
    return out


def stdlib_pairs(files: list[str]) -> list[tuple[bytes, bytes, str]]:
    """(query, document, source) pairs, UTF-8, from Python source `files` in file then source order.

    Files that fail to read or parse are skipped. Filters: docstrings under `MIN_QUERY_CHARS`
    characters or `MIN_QUERY_WORDS` words, bodies with no code besides the docstring, pairs whose
    query (or a query line of `MIN_LEAK_CHARS`+ characters) still appears in the document; then the
    duplicates `_indexed_pairs` describes.
    """
    return [(q.encode(), d.encode(), s) for _, q, d, s in _indexed_pairs(files)]


def _pair_set(rows: list[tuple[str, str, str]]) -> PairSet:
    return PairSet([q.encode() for q, _, _ in rows], [d.encode() for _, d, _ in rows], [s for _, _, s in rows])


def _stdlib_split(cfg: DataConfig, seed: int) -> tuple[PairSet, PairSet]:
    files = stdlib_files(cfg.max_files)
    _, val_idx = held_out_documents(len(files), cfg.val_fraction, seed)
    held = set(val_idx)
    rows = _indexed_pairs(files)
    return (_pair_set([r[1:] for r in rows if r[0] not in held]),
            _pair_set([r[1:] for r in rows if r[0] in held]))


def _lines(path: str, key: str, encoding: str | None):
    """(line number, text) of each non-blank line of `path`; a decoding failure names the line."""
    codec = encoding or "utf-8"
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(codec)
            except UnicodeDecodeError:
                raise ConfigError(f"{key}: {path} line {n} is not valid {codec} text; set data.encoding "
                                  f"to the file's encoding (e.g. data.encoding=latin-1).") from None
            line = line.lstrip("\ufeff") if n == 1 else line
            if line.strip():
                yield n, line


def _jsonl(path: str, fields: list[str], key: str, encoding: str | None) -> list[tuple[list[str], int]]:
    """The string values of `fields` (and the line number) of each record of a JSON Lines file."""
    shape = "{" + ", ".join(f'"{f}": "..."' for f in fields) + "}"
    out = []
    for n, line in _lines(path, key, encoding):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: {path} line {n} is not valid JSON ({e.msg}); each line must be "
                              f"one JSON object such as {shape}.") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{key}: {path} line {n} is a JSON {type(rec).__name__}, not an object "
                              f"such as {shape}.")
        for f, cfg_key in zip(fields, ("data.query_field", "data.document_field")[-len(fields):]):
            if f not in rec:
                raise ConfigError(f"{key}: {path} line {n} has no {f!r} field ({cfg_key}); its fields "
                                  f"are: {', '.join(map(str, rec)) or 'none'}.")
            value = rec[f]
            if not isinstance(value, str) or not value.strip() or not value.encode("utf-8", "ignore") \
                    .decode("utf-8") == value:  # a lone surrogate (JSON "\ud800") has no UTF-8 bytes
                raise ConfigError(f"{key}: {path} line {n} field {f!r} must be a non-empty string of "
                                  f"text, not {json.dumps(value)[:40]}.")
        out.append(([rec[f] for f in fields], n))
    if not out:
        raise ConfigError(f"{key}: {path} holds no records; each line must be one JSON object such as {shape}.")
    return out


def _check_file(path: str, key: str, exts: tuple[str, ...]) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file {path!r}.")
    if os.path.splitext(path)[1].lower() not in exts:
        raise ConfigError(f"{key}: {path!r} is not a {' or '.join(exts)} file; use JSON Lines "
                          f"(one object per line){' or .txt (one document per line)' if '.txt' in exts else ''}.")


def _user_rows(files: list[str], cfg: DataConfig, key: str) -> list[tuple[str, str, str]]:
    fields = [cfg.query_field, cfg.document_field]
    return [(q, d, f"{f}:{n}") for f in files for (q, d), n in _jsonl(f, fields, key, cfg.encoding)]


def _user_split(cfg: DataConfig, seed: int) -> tuple[PairSet, PairSet]:
    """data.files (.jsonl) records; held out: data.val_files when given, else records chosen by
    `held_out_documents` over all records in file order with data.val_fraction."""
    rows = _user_rows(_paths(cfg.files), cfg, "data.files")
    if cfg.val_files:
        train, val = rows, _user_rows(_paths(cfg.val_files), cfg, "data.val_files")
    else:
        train_idx, val_idx = held_out_documents(len(rows), cfg.val_fraction, seed)
        train, val = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
    if not train or not val:
        raise ConfigError(f"data.files holds {len(rows)} pair{'s' * (len(rows) != 1)}, too few to hold out data.val_fraction="
                          f"{cfg.val_fraction} of them and train on the rest; add pairs or set data.val_files.")
    return _pair_set(train), _pair_set(val)


def _extra_documents(cfg: DataConfig) -> list[bytes]:
    """data.corpus_files: .jsonl (data.document_field of each line) or .txt (each non-blank line)."""
    docs: list[bytes] = []
    for f in _paths(cfg.corpus_files):
        if f.lower().endswith(".txt"):
            docs += [line.rstrip("\r\n").encode() for _, line in _lines(f, "data.corpus_files", cfg.encoding)]
        else:
            docs += [d.encode() for (d,), _ in _jsonl(f, [cfg.document_field], "data.corpus_files", cfg.encoding)]
    return docs


def _paths(files) -> list[str]:
    return [os.path.expanduser(str(f)) for f in files]


def _cache_key(cfg: DataConfig, seed: int) -> str:
    user = _paths(cfg.files) + _paths(cfg.val_files) + _paths(cfg.corpus_files)
    files = user + ([] if cfg.files else stdlib_files(cfg.max_files))
    ident = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
    blob = json.dumps([_FORMAT_VERSION, ident, len(cfg.files), len(cfg.val_files), cfg.query_field,
                       cfg.document_field, cfg.encoding, cfg.val_fraction, seed])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_json(p: PairSet) -> dict:
    return {"queries": [q.decode() for q in p.queries], "documents": [d.decode() for d in p.documents],
            "sources": p.sources}


def _from_json(d: dict) -> PairSet:
    return PairSet([q.encode() for q in d["queries"]], [x.encode() for x in d["documents"]], d["sources"])


def build_pairs(cfg: DataConfig, seed: int) -> Pairs:
    """The retrieval pairs of `cfg`: the standard library's when `data.files` is empty, else the
    user's .jsonl records (fields `data.query_field` / `data.document_field`); held out by file
    (stdlib, the LM corpus's split) or by record / `data.val_files` (jsonl). Cached on disk.

    Raises:
        ConfigError: a missing or unreadable file, a line that is not a JSON object with the two
            string fields, or too few records to hold some out.
    """
    for key, exts in (("data.files", (".jsonl",)), ("data.val_files", (".jsonl",)),
                      ("data.corpus_files", (".jsonl", ".txt"))):
        for f in _paths(getattr(cfg, key.split(".")[1])):
            _check_file(f, key, exts)
    path = os.path.join(os.path.expanduser(cfg.cache_dir), "pairs", _cache_key(cfg, seed), "pairs.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return Pairs(_from_json(d["train"]), _from_json(d["val"]), [x.encode() for x in d["extra_documents"]])
    except (OSError, ValueError, KeyError, TypeError):  # not built yet, or a torn/foreign file: rebuild
        pass
    train, val = _user_split(cfg, seed) if cfg.files else _stdlib_split(cfg, seed)
    pairs = Pairs(train, val, _extra_documents(cfg))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"train": _to_json(train), "val": _to_json(val),
                   "extra_documents": [x.decode() for x in pairs.extra_documents]}, f)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn one
    return pairs
