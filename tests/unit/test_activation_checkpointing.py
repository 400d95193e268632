"""trainer.activation_checkpointing: blocks recompute their forward in backward (counted), and the
loss and every gradient equal the run without it, with dropout on (the RNG state is replayed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.blocks import Block
from models.build import build_model
from trainer.data import VOCAB_SIZE
from trainer.transforms.checkpointing import apply_activation_checkpointing, checkpointed_blocks


def _loss_and_grads(make_cfg, mode: str, *overrides: str) -> tuple[torch.Tensor, dict, list[int]]:
    """One fp32 forward + backward of a tiny model with dropout (same init, same batch, same RNG),
    with `mode` applied; returns (loss, gradients, forward calls per block)."""
    cfg = make_cfg("model.dropout=0.1", "model.num_layers=4", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=32)
    model = apply_activation_checkpointing(model.train(), mode, 2)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):  # a sub-module every block runs: once in forward, again when recomputed
        next(iter(b.children())).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # dropout's stream: the same for both runs
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("mode,recomputed", [("full", [0, 1, 2, 3]), ("selective", [0, 2])])
def test_activation_checkpointing_recomputes_and_matches(make_cfg, mode, recomputed):
    ref_loss, ref_grads, ref_calls = _loss_and_grads(make_cfg, "none")
    loss, grads, calls = _loss_and_grads(make_cfg, mode)
    assert ref_calls == [1, 1, 1, 1]
    assert calls == [2 if i in recomputed else 1 for i in range(4)]
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # same ops on the same values in the same order: equal to fp32 rounding
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_selective_stride_and_eval_path(make_cfg):
    cfg = make_cfg("model.num_layers=5")
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=32)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert checkpointed_blocks(model, "selective", 2) == [blocks[i] for i in (0, 2, 4)]
    assert checkpointed_blocks(model, "selective", 3) == [blocks[i] for i in (0, 3)]
    assert checkpointed_blocks(model, "none") == []
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, "full")
    assert [n for n, _ in model.named_parameters()] == names  # state_dicts and checkpoints unchanged
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        apply_activation_checkpointing(model, "some")
