"""Masked language modelling (encoders; BERT, Devlin et al. 2019)."""
from __future__ import annotations

import torch

from trainer.objectives.base import Batch, Objective, Specials, cross_entropy_sum


class MaskedLM(Objective):
    """BERT-style masked LM: `mask_prob` of the non-special tokens predicted; of those 80% [MASK],
    10% a random non-special token, 10% kept (HF `DataCollatorForLanguageModeling`).

    Special ids (the tokenizer's PAD, BOS, EOS, MASK, sentinels; for the byte tokenizer every id
    >= 256) are never selected nor drawn as replacements, and no row is forced to have a target,
    so a row (or a whole batch) may have none: `num_targets` is the true count.
    """

    name = "mlm"

    def __init__(self, mask_prob: float, tokenizer=None):
        self.mask_prob = mask_prob
        self.sp = Specials(tokenizer)

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        tokens = blocks[:, :-1]  # (B, T)
        special = self.sp.is_special[tokens]
        # Draws have the full (B, T) shape whatever the content, so `gen` advances the same per batch.
        sel = (torch.rand(tokens.shape, generator=gen) < self.mask_prob) & ~special
        action = torch.rand(tokens.shape, generator=gen)
        # A random regular id (byte tokenizer: ids 0..255, the same draws as a random byte).
        random_ids = self.sp.regular[torch.randint(0, len(self.sp.regular), tokens.shape, generator=gen)]
        x = torch.where(sel & (action < 0.8), torch.full_like(tokens, self.sp.mask), tokens)
        x = torch.where(sel & (action >= 0.8) & (action < 0.9), random_ids, x)
        return {"x": x, "sel": sel, "y": tokens}

    def num_target_bytes(self, batch: Batch) -> int:
        """Bytes of the original tokens at the predicted positions (`y[sel]`)."""
        return self.sp.count_bytes(batch["y"][batch["sel"]])

    def num_targets(self, batch: Batch) -> int:
        return int(batch["sel"].sum())  # may be 0: the caller guards the division

    def loss(self, model, batch):
        sel = batch["sel"]
        logits = model(batch["x"], select=sel)  # (N, V): the head on the predicted rows only
        return cross_entropy_sum(logits, batch["y"][sel], self.z_loss)
