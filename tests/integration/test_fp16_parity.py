"""precision=fp16 trains the same step as fp32: the GradScaler's loss scale is taken out of the
gradients before they are clipped, logged and applied, so the logged `train/grad_norm` and the
first update agree with an fp32 run of the same seed to fp16's rounding."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from tb import read_scalars
from trainer.run import run
from trainer.runs.model import build_run_model
from trainer.runs.process import seed_all

# optim.eps far above every |gradient| makes AdamW's first update lr * g / (|g| + eps) ~ lr * g / eps:
# linear in the gradient, so a wrongly scaled gradient shows up in the update (with the default
# eps=1e-8 the first update is lr * sign(g) and hides any constant factor).
LINEAR_UPDATE = ["optim.eps=1000", "optim.lr=1.0", "optim.weight_decay=0", "schedule.warmup_steps=0"]
ONE_STEP = ["trainer.max_steps=1", "trainer.log_every=1", "trainer.eval_every=1", "trainer.eval_batches=1",
            "trainer.checkpoint_every=1000"]
# fp16 has a unit roundoff of 2^-11 = 4.9e-4. Autocast rounds each matmul's inputs and outputs to it;
# a forward + backward of a 2-layer model chains ~20 such roundings (embedding, 4 matmuls + the head
# per layer, their input- and weight-gradients), which add in quadrature to ~sqrt(20) x 4.9e-4 =
# 2.2e-3 in the norm of the gradient. 2e-2 leaves ~9x for correlated roundings and the fp16 softmax;
# a gradient still holding the loss scale (65,536), or clipped while scaled (norm 1/65,536 of the
# clip), is off by a factor 1e4 or more.
FP16_REL = 2e-2


def _one_step(tmp_path, precision: str, grad_clip: float) -> tuple[float, dict, dict]:
    cfg = compose_cfg(f"precision={precision}", f"trainer.grad_clip={grad_clip}", *LINEAR_UPDATE, *ONE_STEP)
    summary = run(cfg, run_dir=str(tmp_path / precision))
    assert summary["skipped_steps"] == 0  # the step was taken (no overflow at the initial scale)
    weights = torch.load(tmp_path / precision / "model.pt")
    seed_all(cfg.seed)  # the initial weights, as run() builds them (seeded right before the model)
    initial = build_run_model(cfg, weights["embed.weight"].shape[0]).state_dict()
    update = {k: weights[k] - initial[k] for k in weights if weights[k].is_floating_point()}
    return read_scalars(str(tmp_path / precision))["train/grad_norm"][1], update, cfg


def _norm(tensors: dict) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_fp16_grad_norm_and_first_update_match_fp32(tmp_path, grad_clip):
    """grad_clip=0: nothing clipped, the update is the unscaled gradient. grad_clip=0.05 (below the
    tiny model's first gradient norm, ~1.4): both runs clip the true norm to 0.05, so the update's
    norm is lr x 0.05 / eps by hand, in fp16 as in fp32."""
    norm32, upd32, cfg = _one_step(tmp_path, "fp32", grad_clip)
    norm16, upd16, _ = _one_step(tmp_path, "fp16", grad_clip)
    assert norm16 == pytest.approx(norm32, rel=FP16_REL)  # the logged norm is the unscaled, unclipped one
    assert upd16.keys() == upd32.keys()
    diff = {k: upd16[k] - upd32[k] for k in upd32}
    assert _norm(diff) <= FP16_REL * _norm(upd32), (_norm(diff), _norm(upd32))
    lr, eps = cfg.optim.lr, cfg.optim.eps
    # AdamW's first step by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2, so the
    # update is -lr g / (|g| + eps); with |g| << eps its norm is lr |g| / eps to |g|max / eps.
    applied = min(norm32, grad_clip) if grad_clip > 0 else norm32
    assert _norm(upd32) == pytest.approx(lr * applied / eps, rel=1e-3)
    if grad_clip > 0:
        assert norm32 > 2 * grad_clip  # the clip binds, so the test covers clipping
        assert _norm(upd16) == pytest.approx(lr * grad_clip / eps, rel=FP16_REL)
