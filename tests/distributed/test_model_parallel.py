"""Tensor, 2-D (FSDP x TP) and pipeline parallelism: real torchrun launches on CPU (gloo).

Each layout trains the same global batches as one process, so its loss curve and final weights
follow the single-process run's; each writes DCP checkpoints in the model's own layout, so a
checkpoint of one layout resumes under another (and a single-file one into each).

The model exercises what tensor parallelism has to get right: grouped-query attention (kv heads
split across ranks), SwiGLU (a packed [gate; value] projection), qk-norm and T5 relative
positions (parameters each rank uses on its own heads only, summed over the TP group).

Tolerances: TP splits each row-parallel GEMM's reduction in two partial sums added by an
all-reduce, and FSDP x TP also reduce-scatters gradients, so fp32 results differ from one
process's in their last bits (measured: losses <= 5e-7, weights <= 2e-7 after 6 steps). Adam's
normalized update can carry such a difference to an lr-sized change of a weight whose gradient is
near zero, so the losses are held to the 2e-4 of the DDP/FSDP-vs-one-process tests
(test_parallel.py) and the final weights to 1e-4 (lr 3e-4 x 6 steps would be the worst case of a
sign flip on every step; measured 2e-7). Pipeline stages compute each micro-batch exactly as one
process does (measured: equal), held to the same bounds.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_cli_args
from tb import read_scalars
from test_parallel import torchrun
from trainer.runs import checkpoints as ckpt

ARGS = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.threads=1", "model.dropout=0.0",
        "trainer.checkpoint_every=3", "trainer.keep_checkpoints=5", "trainer.grad_accum=2",
        "model.activation=swiglu", "model.num_kv_heads=2", "model.qk_norm=true", "position=relative"]
LOSS_TOL, WEIGHT_TOL = 2e-4, 1e-4


def _launch(run_dir, *extra, nproc=2):
    proc = torchrun(*tiny_cli_args(run_dir, *ARGS, *extra), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_scalars(str(run_dir))


def _follows(reference: dict, got: dict, steps) -> None:
    for step in steps:
        assert got["train/loss"][step] == pytest.approx(reference["train/loss"][step], abs=LOSS_TOL), step
    assert got["eval/loss"][6] == pytest.approx(reference["eval/loss"][6], abs=LOSS_TOL)


def _same_weights(a, b) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=WEIGHT_TOL, rtol=0, msg=k)


def _resume_dir(tmp_path, source, step: int = 3):
    """A fresh run dir holding only `source`'s checkpoint of `step` (resumed with trainer.resume=auto)."""
    found = [p for p in ckpt.list_checkpoints(str(source / "checkpoints")) if f"step_{step:08d}" in p]
    assert found, list((source / "checkpoints").iterdir())
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = found[0].rsplit("/", 1)[1]
    copy = shutil.copytree if found[0].endswith(".dcp") else shutil.copy
    copy(found[0], run_dir / "checkpoints" / name)
    return run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = run_cli(*tiny_cli_args(run_dir, *ARGS))
    assert proc.returncode == 0, proc.stderr
    return run_dir, read_scalars(str(run_dir))


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp") / "run"
    return run_dir, _launch(run_dir, "parallel=tp")


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pp") / "run"
    return run_dir, _launch(run_dir, "parallel=pp")


def test_tp_follows_one_process(single, tp_run):
    _follows(single[1], tp_run[1], range(1, 7))
    _same_weights(single[0], tp_run[0])
    summary = json.loads((tp_run[0] / "summary.json").read_text())
    assert summary["components"]["parallel"] == "tp" and summary["world_size"] == 2
    shards = sorted(p.name for p in (tp_run[0] / "checkpoints" / "step_00000003.dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # every rank writes its own shard


def test_tp_checkpoint_is_the_model_layout(single, tp_run):
    """The packed projections are saved in the model's own row order: the TP checkpoint's weights
    are the single-process checkpoint's (read without any process group)."""
    tp = ckpt.full_model_state(str(tp_run[0] / "checkpoints" / "step_00000003.dcp"))
    one = ckpt.safe_load(str(single[0] / "checkpoints" / "step_00000003.pt"))["model"]
    assert tp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(tp[k], one[k], atol=WEIGHT_TOL, rtol=0, msg=k)


def test_tp_checkpoint_resumes_on_one_process(tmp_path, single, tp_run):
    """The TP checkpoint, read by one process without a process group."""
    run_dir = _resume_dir(tmp_path, tp_run[0])
    proc = run_cli(*tiny_cli_args(run_dir, *ARGS))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout + proc.stderr
    _follows(single[1], read_scalars(str(run_dir)), range(4, 7))


def test_single_checkpoint_resumes_under_tp(tmp_path, single):
    """A single-file checkpoint: each TP rank takes its (reordered) rows of it."""
    run_dir = _resume_dir(tmp_path, single[0])
    _follows(single[1], _launch(run_dir, "parallel=tp"), range(4, 7))


def test_pp_follows_one_process(single, pp_run):
    _follows(single[1], pp_run[1], range(1, 7))
    _same_weights(single[0], pp_run[0])
    md = ckpt.dcp_metadata(str(pp_run[0] / "checkpoints" / "step_00000003.dcp"))
    blocks = {k.split(".")[3] for k in md.state_dict_metadata if k.startswith("model.decoder.blocks.")}
    assert blocks == {"0", "1"}  # both stages' blocks, under the model's own names


def test_pp_checkpoint_resumes_on_one_process(tmp_path, single, pp_run):
    run_dir = _resume_dir(tmp_path, pp_run[0])
    proc = run_cli(*tiny_cli_args(run_dir, *ARGS))
    assert proc.returncode == 0, proc.stderr
    _follows(single[1], read_scalars(str(run_dir)), range(4, 7))


def test_tp_checkpoint_resumes_under_1f1b(tmp_path, single, tp_run):
    """A TP checkpoint (packed rows in the model's order) loaded by pipeline stages."""
    run_dir = _resume_dir(tmp_path, tp_run[0])
    _follows(single[1], _launch(run_dir, "parallel=pp", "parallel.pp_schedule=1f1b"), range(4, 7))


def test_fsdp_tp_on_four_processes(tmp_path, single):
    """A (2 x 2) mesh: FSDP across its rows, TP within each; then its checkpoint on one process."""
    run_dir = tmp_path / "fsdp_tp"
    _follows(single[1], _launch(run_dir, "parallel=fsdp_tp", nproc=4), range(1, 7))
    _same_weights(single[0], run_dir)
    resumed = _resume_dir(tmp_path, run_dir)
    proc = run_cli(*tiny_cli_args(resumed, *ARGS))
    assert proc.returncode == 0, proc.stderr
    _follows(single[1], read_scalars(str(resumed)), range(4, 7))


def test_pp_three_stages_resume_a_single_file_checkpoint(tmp_path):
    """Three stages resume one process's `.pt` checkpoint (each stage takes its own parameters and
    their Adam state, by the names the checkpoint records) and train on: a middle stage holds no
    embedding and no head, a tied embedding is held by the first and last stage and learned
    positions by all three; the gradients of shared tensors are summed over the stages that hold
    them, so the run follows one process's."""
    args = ["model.num_layers=3", "trainer.batch_size=12", "trainer.grad_accum=3", "position=learned",
            "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=2", "trainer.log_every=1",
            "trainer.threads=1", "model.dropout=0.0"]
    proc = run_cli(*tiny_cli_args(tmp_path / "one", *args))
    assert proc.returncode == 0, proc.stderr
    run_dir = _resume_dir(tmp_path, tmp_path / "one", step=2)
    proc = torchrun(*tiny_cli_args(run_dir, *args, "parallel=pp"), nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    one, pp = read_scalars(str(tmp_path / "one")), read_scalars(str(run_dir))
    assert sorted(pp["train/loss"]) == [3, 4]
    for step in (3, 4):
        assert pp["train/loss"][step] == pytest.approx(one["train/loss"][step], abs=LOSS_TOL), step
    _same_weights(tmp_path / "one", run_dir)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tp_and_pp_on_two_gpus(tmp_path, single):
    """NCCL, one GPU per rank: both layouts train and follow the CPU run's first step (fp32; cuBLAS
    and CPU BLAS sum in other orders, so 1e-3 on a loss of ~5.6)."""
    for kind in ("tp", "pp"):
        got = _launch(tmp_path / kind, f"parallel={kind}", "trainer.device=cuda")
        assert got["train/loss"][1] == pytest.approx(single[1]["train/loss"][1], abs=1e-3), kind
