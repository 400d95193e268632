"""Every component combination builds and trains: model x attention x position x norm x placement.

Each combination takes a few optimizer steps on one fixed batch of real corpus blocks with its
architecture's objective; the loss must fall. Tiny sizes keep all 324 cases to a few seconds each.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from models.build import build_model
from models.build import ARCHS
from models.ops.attention import KERNELS as ATTENTIONS
from models.norm import NORMS
from models.position import POSITIONS
from trainer.objectives import resolve_objective
from trainer.config.validate import validate
from trainer.data import VOCAB_SIZE, load_corpus
from trainer.objectives import build_objective

CASES = list(itertools.product(ARCHS, ATTENTIONS, POSITIONS, NORMS, ["pre", "post"]))


@pytest.fixture(scope="module")
def base_cfg():
    """Composed once; each case sets the group choices' `kind` fields (what the group files set)."""
    from conftest import compose_cfg

    return compose_cfg("model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=1",
                       "model.d_ff=64", "attention.block_size=8", "data.seq_len=24")


@pytest.fixture(scope="module")
def blocks(base_cfg):
    return load_corpus(base_cfg.data, 0).train[:8]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threading overhead outweighs the work
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("arch,attention,position,norm,placement", CASES,
                         ids=["-".join(c) for c in CASES])
def test_combination_trains(base_cfg, blocks, arch, attention, position, norm, placement):
    cfg = base_cfg.copy()
    cfg.model.arch, cfg.attention.kind, cfg.position.kind = arch, attention, position
    cfg.norm.kind, cfg.norm.placement = norm, placement
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=24)
    objective = build_objective(resolve_objective(arch, "auto"), cfg.objective)
    batch = objective.prepare(blocks, torch.Generator().manual_seed(0))
    n = objective.num_targets(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss_sum, _ = objective.loss(model, batch)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
