"""The memory-mapped token store: the same blocks as the earlier in-memory packing, read from the
map without copies, built once per files+settings+tokenizer, identically with several processes,
and with data.val_files as the held-out split."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from trainer.errors import ConfigError
from trainer.config.validate import validate
from trainer.data import BOS, EOS, BatchStream, load_corpus
from trainer.data.store import StoreBlocks

# sha256 (first 16 hex) of the int64 bytes of what the in-memory implementation (datasets.map
# packing into an int64 tensor) produced: the tiny config (30 stdlib files, seq_len 32, seed 0) and
# the whole stdlib corpus at seq_len 128 (674 files: several packing batches of 256 documents).
OLD = {
    (): {"train": "16374f20db44eb25", "val": "80955fd8757f0573", "n_train": 24196, "n_val": 190,
         "num_docs": 30, "num_tokens": 804738, "batch7": "a5bb545f258a567e", "batch_big": "f733dce4570cd246"},
    ("data.max_files=null", "data.seq_len=128"): {
        "train": "99cb1009ad494b26", "val": "445b70a65026ce42", "n_train": 83857, "n_val": 4169, "num_docs": 674,
        "num_tokens": 11355354, "batch7": "9b38e7339a729034", "batch_big": "99111474e55304c9"},
}


def _h(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype("int64").tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("overrides", list(OLD))
def test_byte_store_yields_exactly_the_blocks_of_the_in_memory_packing(overrides):
    cfg = compose_cfg(*overrides)
    corpus = load_corpus(cfg.data, cfg.seed)
    got = {"train": _h(corpus.train), "val": _h(corpus.val), "n_train": len(corpus.train_blocks),
           "n_val": len(corpus.val_blocks), "num_docs": corpus.num_docs, "num_tokens": corpus.num_tokens,
           "batch7": _h(BatchStream(corpus.train_blocks, 8, 0).batch(7)),
           "batch_big": _h(BatchStream(corpus.train_blocks, 16, 3).batch(100000))}  # epoch 66, across a wrap
    assert got == OLD[overrides]


def test_blocks_are_read_from_a_uint16_memory_map_without_a_copy():
    cfg = compose_cfg()
    corpus = load_corpus(cfg.data, cfg.seed)
    train = corpus.train_blocks
    assert isinstance(train, StoreBlocks) and isinstance(train.mm, np.memmap)
    assert train.mm.dtype == np.uint16 and train.mm.shape == (24196 + 190, 33)
    assert os.path.getsize(os.path.join(corpus.store_dir, "tokens.bin")) == (24196 + 190) * 33 * 2
    rows = torch.tensor([5, 0, 24195])
    batch = train[rows]
    assert batch.dtype == torch.int64 and torch.equal(batch, corpus.train[rows])
    assert torch.equal(corpus.val_blocks[torch.tensor([0])], corpus.val[:1])
    starts = np.load(os.path.join(corpus.store_dir, "doc_starts.npy"))
    flat = np.asarray(train.mm).reshape(-1)
    assert len(starts) == 30 and (flat[starts[starts < len(flat)]] == BOS).all()


def test_store_is_built_once_and_keyed_by_the_tokenizer(tmp_path):
    cache = f"data.cache_dir={tmp_path}"
    cfg = compose_cfg(cache, "data.max_files=8")
    first = load_corpus(cfg.data, cfg.seed)
    stamp = os.stat(os.path.join(first.store_dir, "tokens.bin")).st_mtime_ns
    again = load_corpus(cfg.data, cfg.seed)
    assert again.store_dir == first.store_dir
    assert os.stat(os.path.join(again.store_dir, "tokens.bin")).st_mtime_ns == stamp  # not rebuilt
    bpe_cfg = compose_cfg(cache, "data.max_files=8", "tokenizer=bpe", "tokenizer.vocab_size=400")
    bpe = load_corpus(bpe_cfg.data, bpe_cfg.seed, bpe_cfg.tokenizer)
    assert bpe.store_dir != first.store_dir and bpe.tokenizer.kind == "bpe" and bpe.tokenizer.vocab_size == 400
    assert os.path.isfile(os.path.join(bpe.store_dir, "tokenizer.json"))
    assert len(bpe.train_blocks) < len(first.train_blocks)  # merges: fewer tokens for the same text
    reopened = load_corpus(bpe_cfg.data, bpe_cfg.seed, bpe_cfg.tokenizer)
    assert reopened.tokenizer.ident == bpe.tokenizer.ident and torch.equal(reopened.val, bpe.val)
    assert sorted(p for p in os.listdir(tmp_path / "store")) == sorted(
        os.path.basename(c.store_dir) for c in (first, bpe))  # no temporary directory left


@pytest.mark.parametrize("tok", ["byte", "bpe"])
def test_several_processes_build_the_same_store(tmp_path, tok):
    overrides = ["data.max_files=40", f"tokenizer={tok}", "tokenizer.vocab_size=500"]
    one = compose_cfg(f"data.cache_dir={tmp_path / 'one'}", *overrides)
    two = compose_cfg(f"data.cache_dir={tmp_path / 'two'}", "data.num_proc=2", *overrides)
    a = load_corpus(one.data, 0, one.tokenizer)
    b = load_corpus(two.data, 0, two.tokenizer)
    assert a.tokenizer.ident == b.tokenizer.ident
    for name in ("tokens.bin", "doc_starts.npy"):
        with open(os.path.join(a.store_dir, name), "rb") as fa, open(os.path.join(b.store_dir, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def _write(path, body: bytes):
    path.write_bytes(body)
    return str(path)


def test_val_files_are_the_held_out_split(tmp_path):
    train_files = [_write(tmp_path / f"t{i}.txt", f"train {i} ".encode() * 40) for i in range(6)]
    val_doc = "held out ✓ ".encode() * 30 + b"\xff"
    val_file = _write(tmp_path / "v.txt", val_doc)
    cfg = compose_cfg("data=text", f"data.cache_dir={tmp_path / 'c'}", "data.files=[" + ",".join(train_files) + "]",
                      f"data.val_files=[{val_file}]")
    validate(cfg)
    corpus = load_corpus(cfg.data, cfg.seed)
    width = 33
    packed = [BOS, *val_doc, EOS]
    assert corpus.val.flatten().tolist() == packed[: len(packed) // width * width]
    train_text = bytes(t for t in corpus.train.flatten().tolist() if t < 256)
    assert b"held out" not in train_text and all(f"train {i} ".encode() in train_text for i in range(6))
    assert corpus.num_docs == 6  # every data.files document trains


@pytest.mark.parametrize("bad, why", [("missing.txt", "data.val_files: no such file"),
                                      ("v.jsonl", "data.val_files must all share one of the extensions")])
def test_a_bad_val_file_is_one_sentence_before_any_work(tmp_path, bad, why):
    (tmp_path / "v.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "a.txt").write_text("x")
    cfg = compose_cfg(f"data.val_files=[{tmp_path / 'a.txt'},{tmp_path / bad}]")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith(why) and "\n" not in msg and msg.endswith("."), msg
    if bad == "missing.txt":
        assert str(tmp_path / bad) in msg
