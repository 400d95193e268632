"""Unit-level reference checks behind the run-level numbers: weight-decay groups, the held-out
sample, evaluation that leaves the training generators alone, impossible combinations."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from models.build import build_model
from trainer.errors import ConfigError
from trainer.config.validate import validate
from trainer.data.heldout import eval_indices, eval_sample
from trainer.optim import build_optimizer, decay_parameters

LINEAR_NAMES = {"qkv", "q", "kv", "out", "up", "down"}


def _expected_decay(name: str) -> bool:
    """Independent statement of the rule by parameter name: matmul weights and the token
    embedding decay; norms, biases and position tables do not."""
    parts = name.split(".")
    if name in ("embed.weight", "head.weight"):
        return True
    return parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


COMBOS = list(itertools.product(["decoder", "encoder", "encoder_decoder"],
                                ["sinusoidal", "learned", "relative", "rope", "alibi", "none"],
                                ["layernorm", "rmsnorm", "batchnorm"]))


@pytest.mark.parametrize("arch,position,norm", COMBOS)
def test_weight_decay_groups_follow_what_a_parameter_is(arch, position, norm):
    tie = position != "learned"  # vary tying and activation across the matrix too
    act = {"layernorm": "gelu", "rmsnorm": "swiglu", "batchnorm": "relu"}[norm]
    cfg = compose_cfg(f"model={arch}", f"position={position}", f"norm={norm}", f"model.activation={act}",
                      f"model.tie_embeddings={str(tie).lower()}")
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32)
    decay, no_decay = decay_parameters(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[id(p)] for p in decay) == sorted(n for n in by_id.values() if _expected_decay(n))
    assert sorted(by_id[id(p)] for p in no_decay) == sorted(n for n in by_id.values() if not _expected_decay(n))
    if position in ("learned", "relative"):
        assert any("position" in by_id[id(p)] for p in no_decay)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in decay}


def test_decay_groups_under_qat():
    from trainer.quantize import apply_qat

    cfg = compose_cfg("quantize=qat_int8")
    model = apply_qat(build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32),
                      cfg.quantize)
    decay, _ = decay_parameters(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in decay)}
    assert names == {n for n, _ in model.named_parameters() if _expected_decay(n)}


@pytest.mark.parametrize("n,batch,batches", [(190, 8, 2), (1000, 16, 8), (10, 8, 4), (7, 3, 2), (1, 8, 1)])
def test_eval_indices_are_spread_over_the_whole_split(n, batch, batches):
    idx = eval_indices(n, batch, batches)
    k = min(n, batch * batches)
    assert len(idx) == k and len(set(idx.tolist())) == k and idx.tolist() == sorted(idx.tolist())
    assert 0 <= idx[0] and idx[-1] < n
    # the block holding the midpoint of each of k equal slices of the split
    for i, j in enumerate(idx.tolist()):
        assert j <= (i + 0.5) * n / k < j + 1
    if k == n:
        assert idx.tolist() == list(range(n))
    rows = torch.cat(list(eval_sample(torch.arange(n)[:, None], batch, batches)))[:, 0]
    assert torch.equal(rows, idx)


def _loop(cfg, model, val):
    from trainer.data import BatchStream
    from trainer.distributed import Dist
    from trainer.evaluation.heldout import HeldOutLoss
    from trainer.loop import Loop
    from trainer.metrics import Logger
    from trainer.objectives import build_objective
    from trainer.optim import build_scheduler
    from trainer.precision import build_scaler

    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    return Loop(model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg.schedule, 10),
                scaler=build_scaler("fp32", torch.device("cpu")), objective=build_objective("mlm", cfg.objective),
                stream=BatchStream(val, 8, 0),
                evaluators=[HeldOutLoss(build_objective("mlm", cfg.objective), val, cfg.trainer.eval_batches)], gen=torch.Generator().manual_seed(5),
                device=torch.device("cpu"), precision="fp32", dist=Dist(), logger=Logger("", False, 10, 0, False),
                cfg=cfg.trainer, mfu=lambda t: 0.0, save=lambda s: None,
                stop_signal=lambda: 0)


def test_evaluation_is_repeatable_and_leaves_training_generators_alone():
    """Two evaluations of the same weights give the same loss (same blocks, same masks), and
    neither the objective's training generator nor any global generator moves."""
    from trainer.loop import evaluate

    cfg = compose_cfg("model=encoder", "model.dropout=0.1", "trainer.eval_batches=3")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32)
    val = torch.randint(0, 256, (100, 33), generator=torch.Generator().manual_seed(1))
    lp = _loop(cfg, model, val)
    states = (lp.gen.get_state(), torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first, second = evaluate(lp), evaluate(lp)
    assert first == second and first["eval/blocks"] == 24
    assert torch.equal(lp.gen.get_state(), states[0]) and torch.equal(torch.get_rng_state(), states[1])
    assert (np.random.get_state()[1] == states[2]).all() and random.getstate() == states[3]
    assert model.training  # evaluation puts the model back in training mode


def test_stop_request_during_evaluation_saves_and_skips_it():
    """A stop flag raised while evaluating: the evaluation stops at the next batch, the step is
    saved, StopRequested carries the step, and no eval metric is recorded for it."""
    from trainer.errors import StopRequested
    from trainer.loop import TrainState, fit

    cfg = compose_cfg("model=encoder", "trainer.eval_every=2", "trainer.eval_batches=50",
                      "trainer.max_steps=6", "trainer.checkpoint_every=100")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32)
    val = torch.randint(0, 256, (400, 33), generator=torch.Generator().manual_seed(1))
    lp = _loop(cfg, model, val)
    received: list[int] = []
    saved: list[int] = []
    eval_forwards: list[int] = []

    def hook(module, args):
        if not module.training:
            eval_forwards.append(1)
            received.append(15)  # SIGTERM arrives during the first evaluation batch

    model.register_forward_pre_hook(hook)
    lp.stop_signal = lambda: received[0] if received else 0
    lp.save = saved.append
    state = TrainState()
    with pytest.raises(StopRequested) as stop:
        fit(lp, state)
    assert stop.value.step == 2 and saved == [2] and len(eval_forwards) == 1
    assert "eval/loss" not in state.last


def test_span_longer_than_learned_table_is_refused_before_work():
    cfg = compose_cfg("model=encoder_decoder", "position=learned", "objective.noise_density=0.95")
    with pytest.raises(ConfigError, match="position=learned") as e:
        validate(cfg)
    assert "data.seq_len=32" in str(e.value) and "\n" not in str(e.value)
    validate(compose_cfg("model=encoder_decoder", "position=rope", "objective.noise_density=0.95"))
    validate(compose_cfg("model=encoder_decoder", "position=learned"))
