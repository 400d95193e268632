"""Tokenizers behind one interface: `byte` (ids 0..255 are bytes), `bpe` (a byte-level BPE trained on
the training split with Hugging Face `tokenizers`) and `pretrained` (a `tokenizer.json` on disk).

Every tokenizer offers encode(text|bytes, bos, eos) -> ids, decode(ids, skip_special) -> str,
vocab_size, pad_id/bos_id/eos_id/mask_id, sentinel(i), num_sentinels, kind, ident (kind + hash of
its tokenizer.json: what a checkpoint records) and token_bytes() (UTF-8 bytes per id, for bits/byte).

User text is text: `encode` never turns a literal `</s>`, `<mask>`, `[CLS]` or `<extra_id_3>` in the
input into a special id (only the trainer inserts those, by id: `bos=`/`eos=`, the packer, the
objectives), so `decode(encode(t)) == t` for every string a lossless (byte, byte-level BPE)
tokenizer can hold, and bits per byte counts such text by its bytes.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable, Iterator

import numpy as np

from trainer.errors import ConfigError

# Byte-level vocabulary: ids 0..255 are bytes, then the special ids the objectives need.
PAD, BOS, EOS, MASK = 256, 257, 258, 259
SENTINEL0 = 260  # span corruption: sentinels occupy SENTINEL0..VOCAB_SIZE-1, counting down from the top
TOKENIZERS = ("byte", "bpe", "pretrained")  # tokenizer=<kind>
VOCAB_SIZE = 384  # 124 sentinels; a multiple of 64 keeps the embedding/head matmuls aligned
NUM_SENTINELS = VOCAB_SIZE - SENTINEL0
BPE_SENTINELS = 100  # T5's count (`<extra_id_0>` .. `<extra_id_99>`)
SPECIAL_NAMES = ("<pad>", "<s>", "</s>", "<mask>")
# Names other tokenizers use for the same roles (BERT, GPT-2, RoBERTa); the first found is taken.
_ALIASES = {"<pad>": ("<pad>", "[PAD]", "<|padding|>"), "<s>": ("<s>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>"),
            "</s>": ("</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>"), "<mask>": ("<mask>", "[MASK]")}


def model_vocab_size(tokenizer) -> int:
    """The model's embedding rows for `tokenizer`: its vocabulary rounded up to a multiple of 64."""
    return -(-tokenizer.vocab_size // 64) * 64


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; PAD, BOS, EOS, MASK and span sentinels above them."""

    kind = "byte"
    ident = "byte"
    vocab_size = VOCAB_SIZE
    num_sentinels = NUM_SENTINELS
    pad_id, bos_id, eos_id, mask_id = PAD, BOS, EOS, MASK

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Text (UTF-8 encoded) or raw bytes -> ids, optionally wrapped in BOS/EOS."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([BOS] if bos else []) + list(data) + ([EOS] if eos else [])

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        """Documents (bytes) -> one int64 id array each, without BOS/EOS (the packer adds them)."""
        return [np.frombuffer(d, np.uint8).astype(np.int64) for d in docs]

    def sentinel(self, i: int) -> int:
        """Span-corruption sentinel i (`<extra_id_i>`): they count down from the top of the vocabulary."""
        return VOCAB_SIZE - 1 - i

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each id stands for (1 per byte, 0 per special id)."""
        return (np.arange(VOCAB_SIZE) < 256).astype(np.int64)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids -> text; bytes that are not UTF-8 become U+FFFD. Specials are dropped, or shown as
        `<pad>`, `<s>`, `</s>`, `<mask>`, `<extra_id_i>` with `skip_special=False`."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if skip_special:
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._special(i))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Ids -> the exact bytes they stand for (specials dropped)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256)

    def _special(self, i: int) -> str:
        named = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", MASK: "<mask>"}
        if i in named:
            return named[i]
        if SENTINEL0 <= i < VOCAB_SIZE:
            return f"<extra_id_{VOCAB_SIZE - 1 - i}>"
        return f"<unk_{i}>"


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (bpe or pretrained) with the trainer's special ids."""

    def __init__(self, tok, kind: str):
        self.tok, self.kind = tok, kind
        self.json = tok.to_str()
        # Special tokens are never matched inside the text being encoded (`tokenizers` >= 0.19;
        # not part of tokenizer.json, so it is set on every load and `ident` is unchanged).
        tok.encode_special_tokens = True
        self.ident = f"{kind}:{hashlib.sha256(self.json.encode()).hexdigest()[:16]}"
        vocab = tok.get_vocab(with_added_tokens=True)
        ids = {name: next(vocab[a] for a in _ALIASES[name] if a in vocab) for name in SPECIAL_NAMES}
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (ids[n] for n in SPECIAL_NAMES)
        self._sentinels = []
        while f"<extra_id_{len(self._sentinels)}>" in vocab:
            self._sentinels.append(vocab[f"<extra_id_{len(self._sentinels)}>"])
        self.num_sentinels = len(self._sentinels)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        special |= {self.pad_id, self.bos_id, self.eos_id, self.mask_id, *self._sentinels}
        self.special_ids = np.asarray(sorted(special), np.int64)  # ids only the trainer inserts
        self._special = {i: tok.id_to_token(i) for i in special}

    def _as_text(self, enc, text: str) -> list[int]:
        """`enc`'s ids with every special id that came from its own literal text in `text` (a
        tokenizer model whose vocabulary holds `</s>` or `<unk>`, as T5's Unigram does, or a
        non-special added token the trainer uses) replaced by that text one character at a time.
        A special id produced for something else (the model's unknown token for a character
        it cannot hold) is kept."""
        ids = enc.ids
        if not self._special.keys() & set(ids):
            return ids
        out: list[int] = []
        for i, piece, (lo, hi) in zip(ids, enc.tokens, enc.offsets):
            if i in self._special and self._special[i] in text[lo:hi]:
                out += [t.id for ch in piece for t in self.tok.model.tokenize(ch)]
            else:
                out.append(i)
        return out

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Text (bytes are read as UTF-8; invalid bytes become U+FFFD) -> ids, optionally in BOS/EOS."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        ids = self._as_text(self.tok.encode(text, add_special_tokens=False), text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        """Documents (bytes, read as UTF-8) -> one int64 id array each, without BOS/EOS (and
        without any special id: literal special-token text stays text)."""
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(self._as_text(e, t), np.int64) for e, t in zip(encoded, texts)]

    def save(self, path: str) -> None:
        """Write the tokenizer.json (atomically: a temporary name, then rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(self.json)
        os.replace(path + ".tmp", path)

    def sentinel(self, i: int) -> int:
        """Span-corruption sentinel i: the id of `<extra_id_i>`."""
        return self._sentinels[i]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids -> text; special tokens dropped unless `skip_special=False`."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each id stands for; special ids count 0, a non-special
        added token the bytes of its text (it stands for that text wherever it is matched).

        Byte-level vocabularies map each character back to its byte (exact); other vocabularies
        (WordPiece, SentencePiece) count the UTF-8 bytes of the token's decoded text.
        """
        out = _token_bytes(self.json).copy()
        out[self.special_ids] = 0
        return out


@functools.lru_cache(maxsize=8)
def _token_bytes(tok_json: str) -> np.ndarray:
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(tok_json)
    to_byte = {c: 1 for c in pre_tokenizers.ByteLevel.alphabet()}
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in added:
            out[i] = 0 if added[token] else len(token.encode("utf-8"))  # matched as its literal text
            continue
        if all(c in to_byte for c in token):
            out[i] = len(token)  # byte-level: one character per byte
        else:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    return out


def _special_tokens() -> list[str]:
    return [*SPECIAL_NAMES, *(f"<extra_id_{i}>" for i in range(BPE_SENTINELS))]


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalization: decode(encode(t)) == t)
    trained on `texts` with `vocab_size` ids in all, the special tokens first (ids 0..103)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_special_tokens(), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def tokenizer_file(path: str) -> str:
    """The tokenizer.json that `tokenizer.path` names (the file, or a folder holding one).

    Raises:
        ConfigError: no such file, or a folder without tokenizer.json.
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer.path={path!r} is not a tokenizer.json file or a folder holding one.")
    return path


def load_pretrained(path: str, kind: str = "pretrained", say=print) -> HFTokenizer:
    """The tokenizer.json at `path` (a file or a folder); special tokens it lacks (PAD, BOS, EOS,
    MASK under any common name, `<extra_id_0..99>`) are added, and `say` reports which."""
    from tokenizers import AddedToken, Tokenizer

    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:
        raise ConfigError(f"tokenizer.path={file!r} could not be read as a Hugging Face tokenizer.json "
                          f"({type(e).__name__}).") from e
    # A tokenizer.json may carry padding/truncation settings (sentence-transformers' pad to 128,
    # cut at 128): ids here are whole texts, padded and cut by the data code to data.seq_len.
    tok.no_padding()
    tok.no_truncation()
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [n for n in SPECIAL_NAMES if not any(a in vocab for a in _ALIASES[n])]
    has_sentinels = "<extra_id_0>" in vocab
    if not has_sentinels:
        missing += [f"<extra_id_{i}>" for i in range(BPE_SENTINELS)]
    if missing:
        tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        say(f"note: the tokenizer {file} lacked special tokens the objectives need; added {shown}.")
    return HFTokenizer(tok, kind)


def load_tokenizer_json(path: str, kind: str) -> HFTokenizer:
    """A tokenizer saved by this trainer (run dir or corpus cache): nothing is added or changed."""
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_file(path), kind)


def texts_of(docs: Iterable[list[bytes]]) -> Iterator[str]:
    """Document batches (bytes) -> texts for the BPE trainer (invalid UTF-8 becomes U+FFFD)."""
    for batch in docs:
        for d in batch:
            yield d.decode("utf-8", errors="replace")
