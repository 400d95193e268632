"""Causal language modelling: next-token prediction (decoders; GPT, Radford et al. 2018)."""
from __future__ import annotations

import torch

from trainer.objectives.base import Batch, Objective, Specials, cross_entropy_sum


class CausalLM(Objective):
    """Next-token prediction (decoder)."""

    name = "clm"

    def __init__(self, tokenizer=None):
        self.sp = Specials(tokenizer)

    def num_target_bytes(self, batch: Batch) -> int:
        """Bytes of the predicted next tokens `y` (BOS/EOS/PAD targets count 0)."""
        return self.sp.count_bytes(batch["y"])

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        return {"x": blocks[:, :-1], "y": blocks[:, 1:]}

    def num_targets(self, batch: Batch) -> int:
        return batch["y"].numel()

    def loss(self, model, batch):
        return cross_entropy_sum(model(batch["x"]), batch["y"], self.z_loss)
