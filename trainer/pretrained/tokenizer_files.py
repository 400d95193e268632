"""A run's tokenizer as the files `transformers.AutoTokenizer` (and sentence-transformers) load:
tokenizer.json, tokenizer_config.json and special_tokens_map.json.

The byte tokenizer (ids 0..255 = bytes, then PAD, BOS, EOS, MASK and the span sentinels counting
down from 383) is written as a byte-level `tokenizers` model: a BPE with no merges whose 256-entry
vocabulary is GPT-2's byte-to-character alphabet (Radford et al. 2019), each character at its
byte's id, and the special tokens as added tokens at their ids, so it encodes every text to the
same ids as `trainer.data.tokenizer.ByteTokenizer` (one difference: a literal `</s>` in a text
becomes the special id there, as in every Hugging Face tokenizer).

The post-processor adds what this trainer adds: BOS + text + EOS for an encoder (the rows
`trainer.embed` pools), BOS + text for a decoder (`trainer.generate`'s prompts). A tokenizer.json
that already has one (BERT's [CLS] ... [SEP]) keeps it.
"""
from __future__ import annotations

import json
import os

from trainer.data.tokenizer import BOS, EOS, MASK, PAD, SENTINEL0, VOCAB_SIZE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the `ByteLevel` pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer():
    """The byte tokenizer as a `tokenizers.Tokenizer` (ids exactly ByteTokenizer's, 384 in all)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", MASK: "<mask>"}
    names |= {i: f"<extra_id_{VOCAB_SIZE - 1 - i}>" for i in range(SENTINEL0, VOCAB_SIZE)}
    tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in range(256, VOCAB_SIZE)])
    assert all(tok.token_to_id(name) == i for i, name in names.items()), "special ids out of place"
    return tok


def export_tokenizer(tokenizer, encoder: bool):
    """`tokenizer` (ByteTokenizer or HFTokenizer) as a `tokenizers.Tokenizer` whose post-processor
    adds the trainer's BOS (+ EOS for an encoder) unless its tokenizer.json already has one."""
    from tokenizers import Tokenizer, processors

    tok = byte_tokenizer() if tokenizer.kind == "byte" else Tokenizer.from_str(tokenizer.json)
    if tok.post_processor is None:
        bos, eos = tok.id_to_token(tokenizer.bos_id), tok.id_to_token(tokenizer.eos_id)
        single = f"{bos} $A {eos}" if encoder else f"{bos} $A"
        pair = f"{bos} $A {eos} $B:1 {eos}:1" if encoder else f"{bos} $A $B:1"
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)])
    return tok


def write_tokenizer_files(tokenizer, folder: str, encoder: bool, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of `tokenizer` in `folder`.

    `max_length`: `model_max_length` (the longest input the exported model takes).
    """
    tok = export_tokenizer(tokenizer, encoder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    name = tok.id_to_token
    special = {"pad_token": name(tokenizer.pad_id), "bos_token": name(tokenizer.bos_id),
               "eos_token": name(tokenizer.eos_id), "mask_token": name(tokenizer.mask_id)}
    if encoder:  # what BERT-style tokenizers call the first and separating tokens
        special |= {"cls_token": special["bos_token"], "sep_token": special["eos_token"]}
    unk = next((u for u in ("[UNK]", "<unk>", "<|unk|>") if tok.token_to_id(u) is not None), None)
    if unk is not None:
        special["unk_token"] = unk
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
              "clean_up_tokenization_spaces": False, **special}
    for file, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(folder, file), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
