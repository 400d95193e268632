"""Real torchrun launches of 2 CPU processes (gloo): DDP and FSDP match a single process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, tiny_cli_args
from tb import read_scalars

COMMON = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.threads=1", "model.dropout=0.0"]


def torchrun_cmd(*args: str, nproc: int = 2, launcher: tuple[str, ...] = ()) -> list[str]:
    """`torchrun --standalone --nproc_per_node=NPROC [LAUNCHER flags] -m trainer ARGS` as argv."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher, "-m", "trainer", *args]


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(*args, nproc=nproc), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    proc = run_cli(*tiny_cli_args(run_dir, *COMMON))
    assert proc.returncode == 0, proc.stderr
    return read_scalars(str(run_dir))


@pytest.mark.parametrize("parallel,extra", [("ddp", []), ("ddp", ["trainer.grad_accum=2"]), ("fsdp", [])])
def test_two_processes_match_one(tmp_path, single, parallel, extra):
    """Same global batch, same data order: per-step losses agree with the single process."""
    run_dir = tmp_path / "run"
    proc = torchrun(*tiny_cli_args(run_dir, *COMMON, f"parallel={parallel}", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = read_scalars(str(run_dir))
    for step in range(1, 7):
        assert multi["train/loss"][step] == pytest.approx(single["train/loss"][step], abs=2e-4), step
    assert multi["eval/loss"][6] == pytest.approx(single["eval/loss"][6], abs=2e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["components"]["parallel"] == parallel


def test_ddp_resume_with_dropout_is_exact(tmp_path):
    """Each rank's dropout stream is saved and restored: a DDP run split across two torchrun
    launches logs exactly the losses of an uninterrupted DDP run."""
    args = [*COMMON, "model.dropout=0.1", "parallel=ddp"]
    full = torchrun(*tiny_cli_args(tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr[-3000:]
    first = torchrun(*tiny_cli_args(tmp_path / "split", *args, "trainer.steps_per_run=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(*tiny_cli_args(tmp_path / "split", *args))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_scalars(str(tmp_path / "full")), read_scalars(str(tmp_path / "split"))
    assert sorted(b["train/loss"]) == list(range(1, 7))
    for step in range(1, 7):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6), step
