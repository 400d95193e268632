"""The bookkeeping behind tensor and pipeline parallelism, checked against hand-computed values:
the packed-row order TP shards in, its inverse, and which rank trains on which share of a batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import Dist
from trainer.runs.tp_layout import PACKED_ATTR, full_to_model_order, full_to_tp_order, packed_order
from trainer.transforms.parallel import model_copies


def test_packed_order_puts_each_ranks_rows_together():
    # q rows 0-3, k rows 4-5, v rows 6-7 (H=4, Hkv=2, Dh=1) over 2 ranks: rank 0 holds q0 q1 k0 v0.
    assert packed_order([4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    # SwiGLU's [gate; value], d_ff=4, 2 ranks: gate units 0-1 with value units 0-1 on rank 0.
    assert packed_order([4, 4], 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert packed_order([3, 3], 1).tolist() == list(range(6))  # one rank: the model's order


def test_tp_order_round_trips_to_the_model_order():
    model = nn.Module()
    setattr(model, PACKED_ATTR, {"qkv.weight": ([4, 2, 2], 2)})
    w = torch.arange(8.0)[:, None].expand(8, 3).clone()  # row i holds i
    sd = {"qkv.weight": w, "out.weight": torch.ones(2, 2)}
    tp = full_to_tp_order(model, sd)
    assert tp["qkv.weight"][:, 0].tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert tp["out.weight"] is sd["out.weight"]  # not packed: untouched
    assert torch.equal(full_to_model_order(model, tp)["qkv.weight"], w)


def test_ranks_of_one_replica_share_the_batch():
    # fsdp_tp on 4 ranks, TP groups of 2: ranks {0, 1} are replica 0, {2, 3} replica 1.
    copies = model_copies("fsdp_tp", 2, 4)
    places = [Dist(rank=r, world_size=4, copies=copies) for r in range(4)]
    assert [d.dp_rank for d in places] == [0, 0, 1, 1]
    assert {d.dp_size for d in places} == {2}
    assert [d.counts for d in places] == [True, False, True, False]
    assert model_copies("tp", None, 4) == model_copies("pp", None, 4) == 4
    assert model_copies("ddp", None, 4) == model_copies("fsdp", None, 4) == 1
    assert Dist(rank=3, world_size=4).dp_rank == 3  # data parallel: every rank its own share
