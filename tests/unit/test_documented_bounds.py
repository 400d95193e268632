"""Bounds the docs promise, reached and checked against hand computations: the learned
temperature's clamp (exp(logit_scale) <= 100, CLIP's), and the learning-rate schedule's ends
(warmup reaches the peak lr exactly, cosine decay ends exactly at min_lr_ratio x lr and stays)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import compose_cfg
from trainer.objectives.contrastive import MAX_LOGIT_SCALE, apply_learned_temperature, info_nce, logit_scale
from trainer.optim import build_scheduler


def _unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _hand_info_nce(q: torch.Tensor, d: torch.Tensor, scale: float) -> tuple[float, float]:
    """(summed InfoNCE, its derivative w.r.t. log(scale)) in float64, from the definitions:
    L = sum_i [log sum_j exp(s S_ij) - s S_ii], dL/dlog(s) = s sum_i [sum_j p_ij S_ij - S_ii]."""
    sims = q.double() @ d.double().T  # (B, B)
    z = scale * sims
    loss = (torch.logsumexp(z, dim=1) - z.diagonal()).sum()
    p = torch.softmax(z, dim=1)
    grad = scale * ((p * sims).sum(1) - sims.diagonal()).sum()
    return float(loss), float(grad)


def test_learned_scale_is_clamped_at_100_with_zero_gradient_above():
    """logit_scale = log(1000) > log(100): the similarities are scaled by exactly 100 and the
    temperature gets no gradient (it cannot grow further through the clamp)."""
    assert MAX_LOGIT_SCALE == 100.0  # the documented bound (temperature >= 0.01)
    model = apply_learned_temperature(nn.Module(), temperature=1e-3)
    assert float(model.logit_scale) == pytest.approx(math.log(1000.0))
    scale = logit_scale(model, 1e-3)
    assert float(scale) == 100.0
    q, d = _unit_rows(6, 16, 0), _unit_rows(6, 16, 1)
    loss, _ = info_nce(q, d, scale)
    expected, _ = _hand_info_nce(q, d, 100.0)
    # fp32 scores of magnitude <= 100 summed over 6 rows: rounding ~1.2e-7 x 100 x 6 ~ 1e-4 absolute.
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    loss.backward()
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad) == 0.0


@pytest.mark.parametrize("temperature", [0.05, 0.0101])
def test_learned_scale_below_the_clamp_has_the_hand_gradient(temperature):
    """Below the bound (scale 20, and 99.0 just under it) the scale is exp(logit_scale) and the
    gradient w.r.t. logit_scale is the hand derivative (so the zero above is the clamp, not a
    detached parameter)."""
    model = apply_learned_temperature(nn.Module(), temperature=temperature)
    q, d = _unit_rows(6, 16, 2), _unit_rows(6, 16, 3)
    scale = logit_scale(model, temperature)
    assert float(scale) == pytest.approx(1 / temperature, rel=1e-6) and float(scale) < 100.0
    loss, _ = info_nce(q, d, scale)
    loss.backward()
    expected, grad = _hand_info_nce(q, d, 1 / temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # fp32 softmax and sums over 6 x 6 scores of magnitude <= 100: ~1e-4 absolute, as above.
    assert float(model.logit_scale.grad) == pytest.approx(grad, rel=1e-4, abs=1e-4)
    assert abs(grad) > 1e-2  # a gradient that a zero would not match


def _lrs(schedule_overrides: list[str], max_steps: int, steps: int, peak: float = 1.0) -> list[float]:
    """The lr of optimizer steps 0..steps-1 under the run's own schedule config."""
    cfg = compose_cfg(*schedule_overrides, f"optim.lr={peak}")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, cfg.schedule, max_steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_reaches_the_peak_and_cosine_ends_exactly_at_the_floor():
    """warmup_steps=3 of max_steps=11, min_lr_ratio=0.2, peak 0.5: lr = 0.5 x (1/3, 2/3, 1), then
    cosine from 0.5 down to exactly 0.2 x 0.5 at step 11 and after (steps past max_steps, e.g. a
    resume with a lowered max_steps, stay at the floor), halfway (step 7) at 0.5 x 0.6."""
    peak, floor = 0.5, 0.2
    lrs = _lrs(["schedule.warmup_steps=3", f"schedule.min_lr_ratio={floor}"], max_steps=11, steps=16, peak=peak)
    assert lrs[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-12)
    assert lrs[2] == peak and lrs[3] == peak  # the peak is reached exactly, at the end of warmup
    assert lrs[7] == pytest.approx(peak * (floor + (1 - floor) / 2), rel=1e-12)
    assert all(a > b for a, b in zip(lrs[3:11], lrs[4:12]))  # strictly decreasing to the floor
    assert lrs[11:] == [pytest.approx(peak * floor, rel=1e-12)] * 5
    assert min(lrs) >= peak * floor * (1 - 1e-12)


def test_constant_schedule_holds_the_peak_after_warmup_and_zero_warmup_starts_at_it():
    assert _lrs(["schedule=constant", "schedule.warmup_steps=2"], 8, 8) == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], rel=1e-12)
    lrs = _lrs(["schedule.warmup_steps=0", "schedule.min_lr_ratio=0"], 4, 6)
    assert lrs[0] == 1.0  # no warmup: the first step uses the peak
    assert lrs[4:] == [0.0, 0.0]  # min_lr_ratio=0: decays to exactly zero at max_steps
