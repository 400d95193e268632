"""The tokenizers (`trainer.data.tokenizer`), under their older import path."""
from __future__ import annotations

from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, model_vocab_size

__all__ = ["ByteTokenizer", "HFTokenizer", "model_vocab_size"]
