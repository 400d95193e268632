"""Contrastive training split across processes (torchrun, 2 CPU ranks, gloo) or micro-batches
(grad_accum) keeps every document of the global batch as a negative: the run equals the
single-process, whole-batch run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, tiny_cli_args
from tb import read_scalars

STEPS = 6
COMMON = ["model=encoder", "objective=contrastive", f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}",
          "trainer.log_every=1", "trainer.threads=1", "model.dropout=0.0"]
DATA = {"pairs": ["data=pairs"], "blocks": [], "pairs_learned": ["data=pairs", "objective.learn_temperature=true"]}
# The naive split: each rank's (and micro-batch's) loss over its own rows only, so its negatives
# are its own documents, backpropagated as the loop does for an objective without global negatives.
NAIVE = """import runpy
import trainer.objectives.contrastive as c


def per_rank_loss(self, model, batch, rank, world_size):
    q, d = self._embed_pair(model, batch)
    return c.info_nce(q, d, c.logit_scale(model, self.temperature))


c.Contrastive._cached_loss = per_rank_loss
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def torchrun(*args: str, script: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "trainer"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir) -> dict[int, float]:
    return read_scalars(str(run_dir))["train/loss"]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process, whole-batch (grad_accum=1) reference runs, trained once."""
    out = {}
    for name, data in DATA.items():
        run_dir = tmp_path_factory.mktemp(f"single_{name}")
        _ok(run_cli(*tiny_cli_args(run_dir, *COMMON, *data)))
        out[name] = run_dir
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """parallel=ddp over 2 ranks, fixed temperature, on pairs and on blocks, trained once."""
    out = {}
    for name in ("pairs", "blocks"):
        run_dir = tmp_path_factory.mktemp(f"ddp_{name}")
        _ok(torchrun(*tiny_cli_args(run_dir, *COMMON, *DATA[name], "parallel=ddp")))
        out[name] = run_dir
    return out


@pytest.mark.parametrize("data", ["pairs", "blocks"])
def test_ddp_two_ranks_train_the_single_process_model(single, ddp, data):
    """Over 6 DDP steps the gradient norm (before clipping, after DDP's average) equals the
    single process's at every step (relative 1e-4), and so do the final weights (1e-4; Adam
    turns float-order noise in near-zero gradients into ~1e-5), eval loss (2e-4) and recall@10."""
    a, b = read_scalars(str(single[data])), read_scalars(str(ddp[data]))
    for step in range(1, STEPS + 1):
        assert b["train/grad_norm"][step] == pytest.approx(a["train/grad_norm"][step], rel=1e-4), step
    ref, multi = _weights(single[data]), _weights(ddp[data])
    assert ref.keys() == multi.keys()
    for k in ref:
        torch.testing.assert_close(multi[k], ref[k], atol=1e-4, rtol=1e-4, msg=k)
    assert b["eval/loss"][STEPS] == pytest.approx(a["eval/loss"][STEPS], abs=2e-4)
    assert b["eval/recall@10"][STEPS] == pytest.approx(a["eval/recall@10"][STEPS], abs=1e-9)
    assert abs(a["train/loss"][STEPS] - a["train/loss"][1]) > 1e-3  # it trained: equality is not trivial


@pytest.mark.parametrize("data", ["pairs", "blocks"])
def test_ddp_two_ranks_log_the_single_process_loss(single, ddp, data):
    """parallel=ddp over 2 ranks logs the single process's train/loss at every step (2e-4)."""
    ref, multi = _losses(single[data]), _losses(ddp[data])
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert multi[step] == pytest.approx(ref[step], abs=2e-4), step


@pytest.mark.parametrize("data", ["pairs", "blocks"])
def test_grad_accum_matches_the_whole_batch(tmp_path, single, data):
    """trainer.grad_accum=4 in one process (GradCache) logs the whole-batch run's train/loss
    (2e-4) and gradient norm (relative 1e-4) at every step and ends on the same weights (1e-4)."""
    run_dir = tmp_path / "accum"
    _ok(run_cli(*tiny_cli_args(run_dir, *COMMON, *DATA[data], "trainer.grad_accum=4")))
    ref, accum = read_scalars(str(single[data])), read_scalars(str(run_dir))
    for step in range(1, STEPS + 1):
        assert accum["train/loss"][step] == pytest.approx(ref["train/loss"][step], abs=2e-4), step
        assert accum["train/grad_norm"][step] == pytest.approx(ref["train/grad_norm"][step], rel=1e-4), step
    a, b = _weights(single[data]), _weights(run_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4, msg=k)


def test_learned_temperature_under_ddp_matches_one_process(tmp_path, single):
    """objective.learn_temperature=true under parallel=ddp ends on the single process's weights,
    logit_scale included (1e-4)."""
    run_dir = tmp_path / "ddp_learned"
    _ok(torchrun(*tiny_cli_args(run_dir, *COMMON, *DATA["pairs_learned"], "parallel=ddp")))
    a, b = _weights(single["pairs_learned"]), _weights(run_dir)
    assert "logit_scale" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4, msg=k)


def test_learned_temperature_moves_in_one_process(single):
    """The single-process reference for the test above really learns its temperature."""
    import math

    assert abs(float(_weights(single["pairs_learned"])["logit_scale"]) - math.log(1 / 0.05)) > 1e-4


def test_the_naive_per_rank_loss_differs(tmp_path, single):
    """Reference check of the comparison itself: the same DDP launch with each rank's loss over
    its own rows only (half the negatives) is clearly off the whole-batch loss at step 1."""
    script = tmp_path / "naive_trainer.py"
    script.write_text(NAIVE)
    run_dir = tmp_path / "naive"
    _ok(torchrun(*tiny_cli_args(run_dir, *COMMON, *DATA["pairs"], "parallel=ddp", "trainer.max_steps=1",
                                "trainer.eval_every=1"), script=str(script)))
    assert abs(_losses(run_dir)[1] - _losses(single["pairs"])[1]) > 0.1
