"""The byte tokenizer the trainer uses (`trainer.data`): ids 0..255 are bytes, then specials.

A small object with the interface generate/evaluate/embed need, so `load_model` can return the
run's tokenizer; a BPE tokenizer (`tokenizer.json`) can later stand behind the same methods.
"""
from __future__ import annotations

from trainer.data import BOS, EOS, MASK, PAD, SENTINEL0, VOCAB_SIZE


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; PAD, BOS, EOS, MASK and span sentinels above them."""

    kind = "byte"
    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id, mask_id = PAD, BOS, EOS, MASK

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Text (UTF-8 encoded) or raw bytes -> ids, optionally wrapped in BOS/EOS."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([BOS] if bos else []) + list(data) + ([EOS] if eos else [])

    def sentinel(self, i: int) -> int:
        """Span-corruption sentinel i (`<extra_id_i>`): they count down from the top of the vocabulary."""
        return VOCAB_SIZE - 1 - i

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

    def _special(self, i: int) -> str:
        named = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", MASK: "<mask>"}
        if i in named:
            return named[i]
        if SENTINEL0 <= i < VOCAB_SIZE:
            return f"<extra_id_{VOCAB_SIZE - 1 - i}>"
        return f"<unk_{i}>"
