"""Data exactly as given: every byte of every file reaches the model, and the held-out split is
a deterministic function of the seed that never shares a document with training."""
from __future__ import annotations

import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import trainer.data.sources
from conftest import compose_cfg
from trainer.errors import ConfigError
from trainer.data import BOS, EOS, load_corpus

SEQ_LEN = 32  # the tiny config's data.seq_len: blocks of 33 tokens
WIDTH = SEQ_LEN + 1


def _data_cfg(tmp_path, *overrides: str, cache: str = "cache"):
    return compose_cfg("data=text", f"data.cache_dir={tmp_path / cache}", *overrides).data


def _files(paths) -> str:
    return "data.files=[" + ",".join(str(p) for p in paths) + "]"


def _fit(body: bytes, filler: bytes = b".") -> bytes:
    """`body` padded so that BOS + body + EOS fills at least 2 whole blocks (nothing is cut off)."""
    blocks = max(2, -(-(len(body) + 2) // WIDTH))
    return body + filler * (blocks * WIDTH - len(body) - 2)


def _stream(corpus) -> list[int]:
    """One document's packed tokens, in order: the small-corpus fallback holds out its last blocks."""
    return torch.cat([corpus.train.flatten(), corpus.val.flatten()]).tolist()


def _doc_tokens(doc: bytes) -> list[int]:
    return [BOS, *doc, EOS]


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg, msg


def test_crlf_text_reaches_the_model_byte_for_byte(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(_fit(b"line one\r\nline two\r\n\r\nbare cr\rlast line\r\n" * 4))
    corpus = load_corpus(_data_cfg(tmp_path, _files([path])), seed=0)
    raw = open(path, "rb").read()
    assert raw.count(b"\r") == 20
    assert _stream(corpus) == _doc_tokens(raw)
    assert corpus.num_docs == 1 and corpus.num_tokens == len(raw) + 2


def test_text_with_bytes_that_are_not_utf8_gets_through_unchanged(tmp_path):
    path = tmp_path / "mixed.md"
    path.write_bytes(_fit(b"caf\xe9 \xff\xfe \x80\xc3( \xed\xa0\x80 ok \xc3\xa9\r\n" * 3))
    corpus = load_corpus(_data_cfg(tmp_path, _files([path])), seed=0)
    assert _stream(corpus) == _doc_tokens(path.read_bytes())


def test_text_file_with_encoding_is_decoded_with_it(tmp_path):
    path = tmp_path / "latin.txt"
    expected = _fit("caf\xe9 cr\xe8me\r\n".encode("utf-8") * 5)
    path.write_bytes(expected.decode("utf-8").encode("latin-1"))
    assert path.read_bytes().startswith(b"caf\xe9 cr\xe8me\r\ncaf\xe9")
    corpus = load_corpus(_data_cfg(tmp_path, _files([path]), "data.encoding=latin-1"), seed=0)
    assert _stream(corpus) == _doc_tokens(expected)


def test_jsonl_that_is_not_utf8_is_refused_with_file_offset_and_the_key(tmp_path):
    expected = _fit("caf\xe9 cr\xe8me br\xfbl\xe9e, \r\n kept".encode("utf-8"))
    text = expected.decode("utf-8").replace("\r\n", "\\r\\n")  # JSON escapes for CR LF
    raw = b'{"text": "' + text.encode("latin-1") + b'"}\n'
    path = tmp_path / "latin.jsonl"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    assert offset == 13
    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path])), seed=0)
    msg = str(err.value)
    _one_sentence(msg)
    assert str(path) in msg and f"byte offset {offset}" in msg and "data.encoding=" in msg, msg

    corpus = load_corpus(_data_cfg(tmp_path, _files([path]), "data.encoding=latin-1"), seed=0)
    assert expected.startswith("caf\xe9 cr\xe8me br\xfbl\xe9e, \r\n kept.".encode("utf-8"))
    assert _stream(corpus) == _doc_tokens(expected)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 24])
def test_jsonl_offset_is_exact_however_the_file_is_read(tmp_path, monkeypatch, chunk):
    """.jsonl files are checked in chunks: a character cut by a chunk is fine, the offset is the file's."""
    monkeypatch.setattr(trainer.data.sources, "_READ_CHUNK", chunk)
    raw = '{"text": "\u00e9t\u00e9 \u2603\u65e5"}\n'.encode("utf-8") * 3 + b'{"text": "\xc3\xa9\xe9"}\n'
    path = tmp_path / "late.jsonl"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path])), seed=0)
    assert str(err.value) == (f"data.files: {path} is not valid UTF-8 at byte offset {len(raw) - 4} (byte 0xe9); "
                              f"set data.encoding=<codec> to its encoding (e.g. data.encoding=latin-1).")


def test_unknown_encoding_is_one_sentence(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path]), "data.encoding=klingon"), seed=0)
    assert str(err.value) == ("data.encoding='klingon' is not a text codec Python knows; use a name such as "
                              "utf-8, latin-1 or cp1252, or null to take text files byte for byte.")


def test_jsonl_custom_text_field_loads_that_column_exactly(tmp_path):
    path = tmp_path / "rows.jsonl"
    expected = _fit("na\u00efve \u2603 \r\n tab\t end".encode("utf-8"), b"!")
    body = expected.decode("utf-8").replace("\r\n", "\\r\\n").replace("\t", "\\t")  # JSON escapes
    path.write_text('{"title": "decoy", "body": "' + body + '"}\n', encoding="utf-8")
    corpus = load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=body"), seed=0)
    assert expected.startswith("na\u00efve \u2603 \r\n tab\t end!".encode("utf-8"))
    assert _stream(corpus) == _doc_tokens(expected)

    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=content"), seed=0)
    assert str(err.value) == "data.text_field='content' is not a column of the data; columns: title, body."


def test_parquet_custom_text_field_loads_that_column_exactly(tmp_path):
    path = tmp_path / "rows.parquet"
    body = _fit("r\u00e9sum\u00e9\r\n\u65e5\u672c\r\n".encode("utf-8"), b"-").decode("utf-8")
    blob = _fit(b"raw \xff\xfe\r\n")
    pq.write_table(pa.table({"id": [7], "body": [body], "blob": pa.array([blob], pa.binary())}), path)
    corpus = load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=body"), seed=0)
    assert _stream(corpus) == _doc_tokens(body.encode("utf-8"))
    # A binary column is taken as it is, bytes that are not UTF-8 included.
    corpus = load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=blob"), seed=0)
    assert _stream(corpus) == _doc_tokens(blob)

    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=text"), seed=0)
    assert str(err.value) == "data.text_field='text' is not a column of the data; columns: id, body, blob."
    with pytest.raises(ConfigError) as err:
        load_corpus(_data_cfg(tmp_path, _files([path]), "data.text_field=id"), seed=0)
    _one_sentence(str(err.value))
    assert "data.text_field='id'" in str(err.value) and "not text" in str(err.value)


def _tagged_docs(tmp_path, n: int) -> list:
    """`n` files, each exactly 2 blocks: BOS + 16 copies of its tag "[ii]" + EOS."""
    paths = []
    for i in range(n):
        paths.append(tmp_path / "docs" / f"doc{i:02d}.txt")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(f"[{i:02d}]".encode() * 16)
    return paths


def _docs_by_split(corpus) -> dict[str, list[int]]:
    """Which document each block belongs to, per split (every block holds exactly one tag)."""
    out = {}
    for name, blocks in (("train", corpus.train), ("val", corpus.val)):
        ids = []
        for row in blocks.tolist():
            text = bytes(t for t in row if t < 256).decode()
            tags = set(re.findall(r"\[(\d\d)\]", text))
            assert len(tags) == 1 and text == f"[{tags.pop()}]" * 8, text
            ids.append(int(re.match(r"\[(\d\d)\]", text).group(1)))
        out[name] = ids
    return out


def test_held_out_documents_are_disjoint_seeded_and_sized(tmp_path):
    n = 20
    files = _files(_tagged_docs(tmp_path, n))
    corpus = load_corpus(_data_cfg(tmp_path, files, "data.val_fraction=0.25"), seed=0)
    split = _docs_by_split(corpus)
    train, val = set(split["train"]), set(split["val"])
    assert not train & val, "a document is in both splits"
    assert train | val == set(range(n))
    # each document lands wholly in one split: both of its blocks, in order
    assert sorted(split["train"]) == sorted([*train, *train]) and sorted(split["val"]) == sorted([*val, *val])
    assert len(val) == round(n * 0.25) == 5
    assert corpus.num_docs == n and len(corpus.val) == 10 and len(corpus.train) == 30

    again = load_corpus(_data_cfg(tmp_path, files, "data.val_fraction=0.25", cache="cache2"), seed=0)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    other = _docs_by_split(load_corpus(_data_cfg(tmp_path, files, "data.val_fraction=0.25"), seed=1))
    assert set(other["val"]) != val and not set(other["train"]) & set(other["val"])

    tenth = _docs_by_split(load_corpus(_data_cfg(tmp_path, files, "data.val_fraction=0.1"), seed=0))
    assert len(set(tenth["val"])) == round(n * 0.1) == 2 and not set(tenth["train"]) & set(tenth["val"])


def test_hub_offline_is_one_sentence_naming_the_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables once, at import: patch what they read, too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_cfg("data=hub", "data.name=nobody/no-such-corpus", f"data.cache_dir={tmp_path / 'cache'}").data
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_corpus(cfg, seed=0)
    assert time.monotonic() - start < 20, "it went to the network"
    msg = str(err.value)
    _one_sentence(msg)
    assert msg.startswith("data.name='nobody/no-such-corpus' could not be loaded from the Hugging Face hub"), msg
