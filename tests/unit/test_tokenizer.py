"""Tokenizers: exact round trips, the special ids the objectives rely on, and the bytes each id
stands for (what eval/bits_per_byte divides by)."""
from __future__ import annotations

import functools
import os
import random
import sysconfig

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.config.schema import ObjectiveConfig
from trainer.data.tokenizer import BOS, EOS, MASK, PAD, VOCAB_SIZE, ByteTokenizer, load_pretrained, load_tokenizer_json, model_vocab_size, train_bpe
from trainer.objectives import build_objective

_STDLIB = ("argparse.py", "textwrap.py", "json/decoder.py", "string.py", "csv.py")


@functools.lru_cache(maxsize=1)
def _bpe():
    root = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(root, f), encoding="utf-8").read() for f in _STDLIB]
    return train_bpe(texts, 600)


def _random_unicode(n: int, seed: int) -> str:
    """`n` code points drawn from every plane (surrogates excluded: UTF-8 cannot hold them)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        c = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800),
                        rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x110000), 0x0A, 0x0D, 0x09])
        out.append(chr(c))
    return "".join(out)


def test_byte_tokenizer_round_trips_every_byte_value():
    tok = ByteTokenizer()
    raw = bytes(range(256)) + b"caf\xe9 \xff\xfe \xed\xa0\x80 \r\n"  # not UTF-8 on purpose
    ids = tok.encode(raw, bos=True, eos=True)
    assert ids[0] == BOS == 257 and ids[-1] == EOS == 258 and ids[1:-1] == list(raw)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(tok.encode("naïve ✓ 数据")) == "naïve ✓ 数据"
    assert tok.decode([BOS, 104, 105, tok.sentinel(0), MASK, PAD], skip_special=False) == \
        "<s>hi<extra_id_0><mask><pad>"
    assert (tok.vocab_size, tok.pad_id, tok.mask_id, tok.sentinel(0), tok.sentinel(123)) == (384, 256, 259, 383, 260)
    assert model_vocab_size(tok) == VOCAB_SIZE
    assert tok.token_bytes().tolist() == [1] * 256 + [0] * 128


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpe_round_trips_arbitrary_unicode_and_counts_its_bytes(seed):
    tok = _bpe()
    text = _random_unicode(400, seed) + "  def f(x):\r\n\treturn x  # ✓ 👍🏽 e\u0301 \u200d\ufeff"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges happened (not one id per byte)
    # The bytes per id add up to the text's UTF-8 length: what bits_per_byte divides by.
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, *(tok.sentinel(i) for i in range(100))]
    assert not set(ids) & set(specials)
    assert len(set(specials)) == 104 and tok.token_bytes()[specials].sum() == 0
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]


def test_bpe_vocabulary_and_model_rows():
    tok = _bpe()
    assert tok.kind == "bpe" and tok.vocab_size == 600 and model_vocab_size(tok) == 640
    assert tok.ident.startswith("bpe:") and len(tok.ident) == 4 + 16
    assert tok.decode([tok.bos_id, *tok.encode("x = 1"), tok.sentinel(3)], skip_special=False) == \
        "<s>x = 1<extra_id_3>"


def _plain_tokenizer(path, special: list[str]) -> str:
    """A small tokenizer.json built with `tokenizers` (WordLevel on whitespace), with `special`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*special, "[UNK]", "hello", "world", "def", "return"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_pretrained_gets_missing_specials_added_and_says_so(tmp_path):
    _plain_tokenizer(tmp_path / "tokenizer.json", [])
    notes = []
    tok = load_pretrained(str(tmp_path), say=notes.append)  # a folder holding tokenizer.json
    assert len(notes) == 1 and "added <pad>, <s>, </s>, <mask>, <extra_id_0> and 99 more" in notes[0], notes
    assert tok.vocab_size == 5 + 104 and model_vocab_size(tok) == 128
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.sentinel(0), tok.sentinel(99)) == \
        (5, 6, 7, 8, 9, 108)
    assert tok.encode("hello world") == [1, 2]
    assert tok.token_bytes()[[1, 2, 3]].tolist() == [5, 5, 3] and tok.token_bytes()[5:].sum() == 0
    # BERT's names are recognised: only the sentinels are missing.
    bert = _plain_tokenizer(tmp_path / "bert.json", ["[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    notes = []
    tok = load_pretrained(bert, say=notes.append)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert "added <extra_id_0>" in notes[0] and "<pad>" not in notes[0]
    # What a run saves is read back unchanged.
    tok.save(str(tmp_path / "saved.json"))
    again = load_tokenizer_json(str(tmp_path / "saved.json"), "pretrained")
    assert again.ident == tok.ident and again.sentinel(5) == tok.sentinel(5)


def test_pretrained_path_that_is_not_a_tokenizer_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_pretrained(str(tmp_path))
    assert str(err.value) == (f"tokenizer.path={str(tmp_path / 'tokenizer.json')!r} is not a tokenizer.json file "
                              f"or a folder holding one.")


def test_objectives_take_their_special_ids_from_the_tokenizer():
    tok = _bpe()
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8").read()
    flat = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id] * 2)
    blocks = torch.from_numpy(flat[: 40 * 33].reshape(40, 33))
    special = {tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, *(tok.sentinel(i) for i in range(100))}
    mlm = build_objective("mlm", ObjectiveConfig(mask_prob=0.5), tok).prepare(blocks, torch.Generator().manual_seed(0))
    x, sel, y = mlm["x"], mlm["sel"], mlm["y"]
    assert not any(int(t) in special for t in y[sel])  # specials are never predicted
    replaced = sel & (x != y) & (x != tok.mask_id)
    assert replaced.sum() > 10 and not any(int(t) in special for t in x[replaced])  # random ids are regular
    assert (x[sel & (x == tok.mask_id)].numel()) > 0
    span = build_objective("span", ObjectiveConfig(), tok).prepare(blocks, torch.Generator().manual_seed(0))
    assert (span["src"][:, -1] == tok.eos_id).all() and (span["tgt_in"][:, 0] == tok.bos_id).all()
    assert span["tgt"][0, 0] == tok.sentinel(0) and tok.sentinel(1) in span["src"][0].tolist()
    # Bytes of the targets: span targets' regular tokens, clm's next tokens.
    tb = torch.from_numpy(tok.token_bytes())
    assert build_objective("span", ObjectiveConfig(), tok).num_target_bytes(span) == int(tb[span["tgt"]].sum())
    clm = build_objective("clm", ObjectiveConfig(), tok)
    assert clm.num_target_bytes(clm.prepare(blocks, None)) == int(tb[blocks[:, 1:]].sum())
