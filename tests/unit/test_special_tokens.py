"""User text is text: a literal `</s>`, `<mask>`, `[CLS]` or `<extra_id_3>` in the input never becomes
a special id, for every tokenizer kind and on every path text takes (encode, encode_docs, the
token store, a tokenizer reloaded from a run, the store's worker processes, pair rows), and bits
per byte counts such text by its UTF-8 bytes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from trainer.data import load_corpus
from trainer.data.pairs import encode_rows
from trainer.data.store import _encode_in_worker, _init_worker
from trainer.data.tokenizer import ByteTokenizer, load_pretrained, load_tokenizer_json, train_bpe
from trainer.objectives.base import Specials

_SPECIAL_TEXTS = ["<pad>", "<s>", "</s>", "<mask>", "<extra_id_0>", "<extra_id_3>", "<extra_id_99>",
                  "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "<unk>", "<|endoftext|>"]
_TRAIN_TEXT = ["def f(x):\n    return x + 1  # plain text, no markup\n", "hello world, the quick brown fox"] * 20


def _contexts(token: str) -> list[str]:
    """`token` where user text puts it: alone, quoted in code, repeated, glued to words, in markup."""
    return [token, f"x = '{token}'", f"{token}{token}", f"a{token}b", f" {token} ", f"<b>{token}</b>",
            f"naïve ✓ {token} 数据\n", f"if tok == \"{token}\":\n\treturn"]


def _strings(tok) -> list[str]:
    """Every context of every special-token text: the common names, and each special this
    tokenizer has (its aliases and all its sentinels)."""
    texts = set(_SPECIAL_TEXTS)
    if not isinstance(tok, ByteTokenizer):
        texts |= {tok.tok.id_to_token(i) for i in _special_ids(tok)}
    texts |= {f"<extra_id_{i}>" for i in range(0, 100, 7)}
    out = [s for t in sorted(texts) for s in _contexts(t)]
    return out + ["<s>bold</s> and <mask> <pad> <extra_id_3>", "".join(sorted(texts))]


@functools.lru_cache(maxsize=1)
def _bpe():
    return train_bpe(_TRAIN_TEXT, 400)


def _byte_level_json(path) -> str:
    """A GPT-2/BERT-style byte-level tokenizer.json whose specials are named [PAD] [CLS] [SEP] [MASK]
    and <|endoftext|> (the trainer takes the first four as PAD/BOS/EOS/MASK by alias)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TRAIN_TEXT, trainers.BpeTrainer(
        vocab_size=350, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


def _unigram_json(path) -> str:
    """A T5-style SentencePiece (Unigram) tokenizer.json: `<pad>`, `</s>` and `<unk>` are pieces of
    the model's own vocabulary with the best score, so the model itself would pick them in text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set("".join(_SPECIAL_TEXTS) + "abcdefghijklmnopqrstuvwxyz_0123456789=' "))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(path))
    return str(path)


def _tokenizers(tmp_path) -> dict:
    return {"byte": ByteTokenizer(), "bpe": _bpe(),
            "pretrained": load_pretrained(_byte_level_json(tmp_path / "bl.json"), say=lambda m: None)}


def _special_ids(tok) -> set[int]:
    if isinstance(tok, ByteTokenizer):
        return set(range(256, tok.vocab_size))
    return {tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, *(tok.sentinel(i) for i in range(tok.num_sentinels)),
            *(i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special)}


@pytest.mark.parametrize("kind", ["byte", "bpe", "pretrained"])
def test_literal_special_text_round_trips_with_no_special_id(kind, tmp_path):
    """decode(encode(t)) == t over every special-token text in many contexts; the ids hold no
    special id; the bytes per id add up to the text's UTF-8 length (what bits per byte divides
    by: a literal `</s>` is 4 bytes, not a 0-byte end of sequence)."""
    tok = _tokenizers(tmp_path)[kind]
    special, nbytes = _special_ids(tok), tok.token_bytes()
    assert len(special) >= 104
    for text in _strings(tok):
        ids = tok.encode(text)
        assert not set(ids) & special, (text, [i for i in ids if i in special])
        assert tok.decode(ids) == text and tok.decode(ids, skip_special=False) == text
        assert int(nbytes[ids].sum()) == len(text.encode("utf-8")), text
        assert Specials(tok).count_bytes(torch.tensor(ids)) == len(text.encode("utf-8"))
        # Only the trainer adds specials, by id.
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    docs = [s.encode() for s in _strings(tok)]
    assert [d.tolist() for d in tok.encode_docs(docs)] == [tok.encode(d) for d in docs]


def test_the_bpe_example_that_used_to_lose_its_text():
    tok = _bpe()
    for text, n_bytes in (("x = '</s>'", 10), ("<s>bold</s> and <mask> <pad> <extra_id_3>", 41)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and int(tok.token_bytes()[ids].sum()) == n_bytes
        assert tok.eos_id not in ids and tok.bos_id not in ids and tok.mask_id not in ids


def test_a_reloaded_tokenizer_and_the_store_workers_keep_text_as_text(tmp_path):
    """The setting is not part of tokenizer.json: what a run saves and tools reload (generate, embed,
    evaluate), and what the store's worker processes rebuild from the JSON, behave the same."""
    for kind, tok in list(_tokenizers(tmp_path).items())[1:]:
        tok.save(str(tmp_path / f"{kind}.json"))
        again = load_tokenizer_json(str(tmp_path / f"{kind}.json"), kind)
        _init_worker(kind, tok.json)
        for text in _strings(tok):
            ids = again.encode(text)
            assert ids == tok.encode(text) and not set(ids) & _special_ids(tok), (kind, text)
            assert _encode_in_worker([text.encode()], np.int64)[0].tolist() == ids


def test_a_sentencepiece_model_never_emits_its_special_pieces_for_text(tmp_path):
    """T5's Unigram holds `</s>`/`<pad>`/`<unk>` as model pieces: the literal text is spelled out
    from ordinary pieces instead (and decodes back to itself), while a character the model cannot
    hold still becomes its unknown token."""
    notes: list[str] = []
    tok = load_pretrained(_unigram_json(tmp_path / "t5.json"), say=notes.append)
    special = _special_ids(tok)
    assert {tok.pad_id, tok.eos_id} == {0, 1} and 2 in special
    for text in ["x = '</s>'", "</s></s>", "a<pad>b", "x <unk> y", "<s>bold</s> and <mask> <pad> <extra_id_3>"]:
        ids = tok.encode(text)
        assert not set(ids) & special, (text, ids)
        assert tok.decode(ids) == text
    assert tok.encode("é")[-1] == 2  # not in the vocabulary: the unknown id, as before


def test_the_token_store_holds_only_the_packers_specials(tmp_path):
    """Documents full of literal special-token text, tokenized into the store (bpe and pretrained):
    the only special ids in it are one BOS and one EOS per document, and the text decodes back."""
    lines = ["<s>bold</s> and <mask> <pad> <extra_id_3> [CLS] [SEP] [MASK] <|endoftext|>" * 3 + f" doc {i}"
             for i in range(12)]
    for i, line in enumerate(lines):
        (tmp_path / f"d{i}.txt").write_text(line)
    files = "data.files=[" + ",".join(str(tmp_path / f"d{i}.txt") for i in range(12)) + "]"
    path = _byte_level_json(tmp_path / "bl.json")
    for tok_args in (["tokenizer=bpe", "tokenizer.vocab_size=400"], ["tokenizer=pretrained", f"tokenizer.path={path}"]):
        cfg = compose_cfg("data=text", files, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
                          "data.val_fraction=0.2", *tok_args)
        corpus = load_corpus(cfg.data, 0, cfg.tokenizer, say=lambda m: None)
        tok = corpus.tokenizer
        flat = np.fromfile(f"{corpus.store_dir}/tokens.bin", dtype=np.uint16 if tok.vocab_size <= 65536 else np.uint32)
        assert len(flat) == corpus.num_tokens
        starts = np.load(f"{corpus.store_dir}/doc_starts.npy")
        special = _special_ids(tok)
        bos = {int(s) for s in starts if s < len(flat)}
        assert {i for i, t in enumerate(flat.tolist()) if t in special and t != tok.eos_id} == bos
        assert (flat == tok.eos_id).sum() <= len(lines)
        # A whole document between its BOS and EOS decodes to its line.
        first = int(starts[0])
        end = first + 1 + int(np.argmax(flat[first + 1:] == tok.eos_id))
        assert tok.decode(flat[first + 1:end].tolist()) in lines


def test_pair_rows_hold_text_between_the_trainers_bos_and_eos(tmp_path):
    tok = _tokenizers(tmp_path)["pretrained"]
    texts = [s.encode() for s in _strings(tok)[:40]]
    rows = encode_rows(texts, tok, 64)
    special = _special_ids(tok)
    for row, text in zip(rows.tolist(), texts):
        ids = [i for i in row if i != tok.pad_id]
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not set(ids[1:-1]) & special
        assert len(ids) == 64 or tok.decode(ids) == text.decode()
