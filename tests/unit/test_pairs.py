"""Retrieval pairs: no query is findable in any document, the split is the LM corpus's by-file split,
builds are deterministic and cached, and user .jsonl is read exactly or refused with one sentence."""
from __future__ import annotations

import ast
import json
import re
import textwrap
from collections import defaultdict

import pytest

import trainer.data.code_pairs
from trainer.errors import ConfigError
from trainer.config.schema import DataConfig
from trainer.data import BOS, EOS, load_corpus, stdlib_files
from trainer.data.heldout import held_out_documents
from trainer.data.code_pairs import build_pairs, stdlib_pairs

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_QUOTES = re.compile(r"""^[rRbBuU]*(\"\"\"|'''|"|')|(\"\"\"|'''|"|')$""")


@pytest.fixture(scope="module")
def pairs200() -> list[tuple[bytes, bytes, str]]:
    return stdlib_pairs(stdlib_files(200))


@pytest.fixture(scope="module", params=[200, None], ids=["max_files=200", "full"])
def stdlib_set(request) -> list[tuple[bytes, bytes, str]]:
    return request.getfixturevalue("pairs200") if request.param else stdlib_pairs(stdlib_files())


def test_no_query_is_findable_in_any_document(stdlib_set):
    pairs = stdlib_set
    assert len(pairs) >= 1000  # an unstripped docstring would make the builder drop (nearly) all pairs
    long_lines = defaultdict(set)  # every query line of 40+ characters -> the pairs it belongs to
    for i, (q, d, src) in enumerate(pairs):
        query, doc = q.decode(), d.decode()
        assert query not in doc, src
        for line in query.splitlines():
            if len(line.strip()) >= 40:
                assert line.strip() not in doc, src
                long_lines[line.strip()].add(i)
    for i, (_, d, src) in enumerate(pairs):  # nor any other pair's query (a nested docstring)
        for line in d.decode().splitlines():
            for text in {line.strip(), _QUOTES.sub("", line.strip())}:
                assert not long_lines.get(text, set()) - {i}, (src, text)
    parsed = 0
    for _, d, src in pairs:  # and no def/class inside a document keeps a docstring
        try:
            tree = ast.parse(d.decode())
        except SyntaxError:
            continue  # dedent cannot undo an under-indented multi-line string: a handful
        parsed += 1
        assert all(ast.get_docstring(n) is None for n in ast.walk(tree) if isinstance(n, _DEFS)), src
    assert parsed >= 0.99 * len(pairs)


def test_sources_name_stdlib_file_and_qualified_name(stdlib_set):
    sources = [s for _, _, s in stdlib_set]
    # A name defined twice (platform branches, a property's setter) may give two pairs; never the
    # same query or the same document twice.
    assert len({q for q, _, _ in stdlib_set}) == len({d for _, d, _ in stdlib_set}) == len(stdlib_set)
    assert "json/decoder.py:JSONDecoder.decode" in sources or len(stdlib_set) < 5000
    assert all(re.fullmatch(r"[\w./-]+\.py:[\w.]+", s) for s in sources)


SOURCE = '''\
import functools


@functools.cache
def decorated(x):
    """Return the square of x, remembering earlier answers."""
    return x * x


class Outer:
    """An outer class holding two documented methods."""

    def method(self):
        """Compute the method answer for the outer class."""

        def inner():
            """Inner helper that nobody can see from outside."""
            return 1
        return inner()

    async def stub(self):
        """This abstract coroutine must be overridden please."""

    def one_line(self): "Docstring on the same line as the def."; return 2


def short():
    """Too short."""
    return 0


def same_a():
    """Duplicate docstring shared by two functions."""
    return "a"


def same_b():
    """Duplicate  docstring shared by two FUNCTIONS."""
    return "b"
'''


def test_extraction_on_a_known_file(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(SOURCE)
    (tmp_path / "broken.py").write_text("def f(:\n    '''Never parsed, so never a pair.'''\n")
    got = {s.split(":")[1]: (q.decode(), d.decode())
           for q, d, s in stdlib_pairs([str(tmp_path / "broken.py"), str(path)])}
    # Dropped: short (trivial query), Outer.stub (no code), same_a/same_b (same query up to case
    # and spaces). Kept: each other documented def with every docstring inside it cut out.
    assert sorted(got) == ["Outer", "Outer.method", "Outer.method.inner", "Outer.one_line", "decorated"]
    assert got["decorated"] == ("Return the square of x, remembering earlier answers.",
                                "@functools.cache\ndef decorated(x):\n    return x * x\n")
    assert got["Outer.method"][1] == textwrap.dedent('''\
        def method(self):

            def inner():
                return 1
            return inner()
        ''')
    assert got["Outer.method.inner"] == ("Inner helper that nobody can see from outside.", "def inner():\n    return 1\n")
    assert got["Outer.one_line"][1] == "def one_line(self): return 2\n"
    assert got["Outer"][1] == textwrap.dedent('''\
        class Outer:

            def method(self):

                def inner():
                    return 1
                return inner()

            async def stub(self):
                ...

            def one_line(self): return 2
        ''')


def _data(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_split_is_held_out_documents_by_file(tmp_path, pairs200):
    seed = 3
    files = stdlib_files(200)
    pairs = build_pairs(_data(tmp_path, max_files=200), seed)
    _, val_idx = held_out_documents(len(files), 0.05, seed)
    val_files = {trainer.data.code_pairs._relative(files[i]) for i in val_idx}
    assert len(pairs.val) > 0 and len(pairs.train) > 0
    # every pair is in exactly one split, the held-out one exactly when its file is held out
    expected_val = [p for p in pairs200 if p[2].split(":")[0] in val_files]
    assert list(zip(pairs.val.queries, pairs.val.documents, pairs.val.sources)) == expected_val
    assert list(zip(pairs.train.queries, pairs.train.documents, pairs.train.sources)) == \
        [p for p in pairs200 if p[2].split(":")[0] not in val_files]
    assert pairs.extra_documents == []


def test_val_pairs_come_from_the_files_the_lm_corpus_holds_out(tmp_path):
    cfg = _data(tmp_path, max_files=60, val_fraction=0.1, seq_len=64)
    corpus = load_corpus(cfg, seed=1)
    files = stdlib_files(60)
    _, val_idx = held_out_documents(len(files), 0.1, 1)
    expected = []
    for i in val_idx:  # the LM's held-out stream: BOS + file bytes + EOS for each held-out file
        with open(files[i], "rb") as f:
            expected += [BOS, *f.read(), EOS]
    stream = corpus.val.flatten().tolist()
    assert len(stream) > 0.5 * len(expected) and stream == expected[:len(stream)]
    pairs = build_pairs(cfg, seed=1)
    val_files = {trainer.data.code_pairs._relative(files[i]) for i in val_idx}
    assert len(pairs.val) > 0 and {s.split(":")[0] for s in pairs.val.sources} <= val_files
    assert not {s.split(":")[0] for s in pairs.train.sources} & val_files


def test_builds_are_deterministic_and_cached(tmp_path, monkeypatch):
    a = build_pairs(DataConfig(cache_dir=str(tmp_path / "a"), max_files=60), 0)
    b = build_pairs(DataConfig(cache_dir=str(tmp_path / "b"), max_files=60), 0)
    assert a == b
    monkeypatch.setattr(trainer.data.code_pairs, "_stdlib_split", lambda *_: pytest.fail("the cache was not used"))
    assert build_pairs(DataConfig(cache_dir=str(tmp_path / "a"), max_files=60), 0) == a
    assert list((tmp_path / "a" / "pairs").glob("*/pairs.json"))


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_user_jsonl_with_custom_fields(tmp_path):
    recs = [{"q": f"question {i} ünïcode", "code": f"def f{i}(): return {i}", "id": i} for i in range(20)]
    f = _jsonl(tmp_path / "p.jsonl", recs)
    corpus_j = _jsonl(tmp_path / "c.jsonl", [{"code": "extra one"}, {"code": "extra two"}])
    corpus_t = tmp_path / "c.txt"
    corpus_t.write_text("line doc a\n\nline doc b\n")
    cfg = _data(tmp_path, files=[f], query_field="q", document_field="code", val_fraction=0.2,
                corpus_files=[corpus_j, str(corpus_t)])
    pairs = build_pairs(cfg, seed=5)
    train_idx, val_idx = held_out_documents(20, 0.2, 5)
    assert pairs.val.queries == [recs[i]["q"].encode() for i in val_idx]
    assert pairs.val.documents == [recs[i]["code"].encode() for i in val_idx]
    assert pairs.train.queries == [recs[i]["q"].encode() for i in train_idx]
    assert pairs.val.sources == [f"{f}:{i + 1}" for i in val_idx]
    assert pairs.extra_documents == [b"extra one", b"extra two", b"line doc a", b"line doc b"]
    v = _jsonl(tmp_path / "v.jsonl", [{"q": "held out query", "code": "held out doc"}])
    pairs = build_pairs(_data(tmp_path, files=[f], val_files=[v], query_field="q", document_field="code"), 5)
    assert len(pairs.train) == 20 and pairs.val.queries == [b"held out query"]


@pytest.mark.parametrize("content, message", [
    ('{"query": "a", "document": "b"}\n{"query": "c"}\n', r"p\.jsonl line 2 has no 'document' field "
                                                          r"\(data\.document_field\); its fields are: query\."),
    ('{"query": "a", "document": "b"}\n\n{"query": "c", oops}\n', r"p\.jsonl line 3 is not valid JSON"),
    ('["query", "document"]\n', r"p\.jsonl line 1 is a JSON list, not an object"),
    ('{"query": 3, "document": "b"}\n', r"line 1 field 'query' must be a non-empty string of text, not 3\."),
    ('{"query": "a \\ud800 b", "document": "b"}\n', r"line 1 field 'query' must be a non-empty string of text"),
    ("\n\n", r"p\.jsonl holds no records"),
])
def test_bad_jsonl_is_refused_with_one_sentence(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=r"^data\.files: .*" + message):
        build_pairs(_data(tmp_path, files=[str(tmp_path / "p.jsonl")]), 0)


def test_missing_or_wrong_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.files: no such file '.*nope\.jsonl'\.$"):
        build_pairs(_data(tmp_path, files=[str(tmp_path / "nope.jsonl")]), 0)
    (tmp_path / "p.csv").write_text("query,document\n")
    with pytest.raises(ConfigError, match=r"^data\.files: '.*p\.csv' is not a \.jsonl file"):
        build_pairs(_data(tmp_path, files=[str(tmp_path / "p.csv")]), 0)
    with pytest.raises(ConfigError, match=r"^data\.corpus_files: no such file"):
        build_pairs(_data(tmp_path, max_files=5, corpus_files=[str(tmp_path / "c.jsonl")]), 0)
    f = _jsonl(tmp_path / "one.jsonl", [{"query": "only", "document": "one"}])
    with pytest.raises(ConfigError, match=r"^data\.files holds 1 pair, too few"):
        build_pairs(_data(tmp_path, files=[f]), 0)
    (tmp_path / "bad.jsonl").write_bytes(b'{"query": "caf\xe9", "document": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 1 is not valid utf-8 text; set data\.encoding"):
        build_pairs(_data(tmp_path, files=[str(tmp_path / "bad.jsonl")]), 0)
