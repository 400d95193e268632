"""Per-parameter gradients of a 2-process step (torchrun, gloo) equal one process's, parameter by
parameter, under DDP and FSDP, and for the contrastive learned temperature (which DDP leaves alone).

AdamW's first update is lr * g / (|g| + eps): with the default eps=1e-8 it is lr * sign(g), which
hides a gradient multiplied by a constant (e.g. the world size). With optim.eps=1000, far above
every |g|, the update is lr * g / eps, linear in the gradient, so comparing the weights after one
step compares every parameter's gradient (no clipping, no weight decay, no warmup).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_cfg, run_cli, tiny_cli_args
from trainer.run import run

LINEAR_STEP = ["trainer.max_steps=1", "trainer.eval_every=1", "trainer.eval_batches=1", "trainer.log_every=1",
               "trainer.checkpoint_every=1000", "trainer.threads=1", "model.dropout=0.0", "optim.eps=1000",
               "optim.lr=1.0", "optim.weight_decay=0", "trainer.grad_clip=0", "schedule.warmup_steps=0"]
CASES = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "ddp-learned-temperature": ["parallel=ddp", "model=encoder", "objective=contrastive",
                                "objective.learn_temperature=true"],
}
# Two ranks sum half-batch gradients where one process sums the whole batch: the same fp32 terms
# added in another order. Each weight gradient is a sum over B x T = 256 tokens, so the reordering
# error is ~1.2e-7 x sqrt(256) ~ 2e-6 of the gradient's magnitude (the forward is identical, the
# all-reduce adds one more rounding). 1e-4 of each parameter's update norm leaves 50x for
# cancellation; a factor 2 (world size) or 1/2 on any one parameter is off by 0.5 or more.
REL = 1e-4


def _update(run_dir, cfg) -> dict[str, torch.Tensor]:
    """Weights after the step minus the initial weights (rebuilt with the run's seed)."""
    from trainer.runs.model import build_run_model
    from trainer.runs.process import seed_all

    weights = torch.load(run_dir / "model.pt")
    seed_all(cfg.seed)
    initial = build_run_model(cfg, weights["embed.weight"].shape[0]).state_dict()
    return {k: (weights[k] - initial[k]).double() for k in weights if weights[k].is_floating_point()}


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_gradients_equal_one_process_per_parameter(tmp_path, case):
    extra = CASES[case]
    model_args = [a for a in extra if not a.startswith("parallel=")]
    cfg = compose_cfg(*LINEAR_STEP, *model_args)
    run(cfg, run_dir=str(tmp_path / "single"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
           *tiny_cli_args(tmp_path / "multi", *LINEAR_STEP, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _update(tmp_path / "single", cfg), _update(tmp_path / "multi", cfg)
    assert one.keys() == two.keys()
    if "learn_temperature" in " ".join(extra):
        assert "logit_scale" in one and float(one["logit_scale"].abs()) > 1e-6  # it did get a gradient
    for name in one:
        scale = float(one[name].norm())
        assert scale > 0, name  # every parameter moved, so the comparison is not of zeros
        assert float((two[name] - one[name]).norm()) <= REL * scale, (name, float(two[name].norm()) / scale)
