"""Elastic restart: a real torchrun launch of 2 CPU processes (gloo) with `--max-restarts=1`, one
worker SIGKILLed mid-run. torchrun stops the group and restarts both workers; with the default
`trainer.resume=auto` they resume from the newest complete checkpoint of the run dir and the run
finishes as the uninterrupted one does.

No hook in the trainer: the test kills a real worker process (a child of torchrun, found through
/proc) as soon as a complete checkpoint exists. The run is long enough (48 steps of ~20 ms after a
first checkpoint at step 4) that the kill lands mid-run, not after the end.

torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default (torch 2.13) its c10d rendezvous
keeps one TCPStore for every restart and the workers' process group uses it without a per-attempt
prefix, so a restarted worker can read the dead attempt's gloo addresses and fail ("connectFullMesh
failed ... Connection refused") or hang in `init_process_group` (pytorch/pytorch#135712; reproduced
here with a plain gloo script, about 7 restarts in 10). With the variable set, rank 0 of each attempt
hosts a fresh store (10 restarts in 10 succeeded, rank 0 or rank 1 killed).

Tolerance: the restarted group has the same world size, so each rank gets its own saved RNG streams
back and gradients are reduced in the same order; the resumed losses are expected to equal the
uninterrupted run's (a DDP run split across two launches agrees to 1e-6, test_parallel.py; here
they are bit-equal, measured). The 2e-4 bound is the one the 2-process tests use for runs that
continue another's curve (test_parallel.py, test_dcp.py); a resume off by a step would show far
more (consecutive losses differ by 2e-3 to 0.5, median 0.1, in this run), and the "resuming from"
line proves the restart did not start over from step 0.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_cli_args
from tb import read_scalars
from test_parallel import torchrun, torchrun_cmd

MAX_STEPS = 48
EVERY = 4
ARGS = [f"trainer.max_steps={MAX_STEPS}", f"trainer.checkpoint_every={EVERY}", "trainer.log_every=1",
        "trainer.threads=1", "model.dropout=0.0", "parallel=ddp"]
KILLED_RANK = 0  # the worker SIGKILLed: its LOCAL_RANK (with --standalone, also its rank)
CHECKPOINT = re.compile(r"step_(\d{8})\.pt")  # complete single-file checkpoints only (not .pt.tmp)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _worker(launcher: int, local_rank: int) -> int | None:
    """The pid of torchrun's worker with LOCAL_RANK=local_rank in its first attempt, if it exists."""
    for pid in _children(launcher):
        env = _environ(pid)
        if env.get("LOCAL_RANK") == str(local_rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return pid
    return None


def _first_checkpoint(directory: Path) -> int | None:
    steps = [int(m.group(1)) for p in (directory.iterdir() if directory.is_dir() else [])
             if (m := CHECKPOINT.fullmatch(p.name))]
    return min(steps) if steps else None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = torchrun(*tiny_cli_args(run_dir, *ARGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_scalars(str(run_dir))["train/loss"]


def test_killed_worker_restarts_and_resumes(tmp_path, uninterrupted):
    """SIGKILL rank 0 once a checkpoint exists (the rank that writes checkpoints and logs, and hosts
    the group's store): torchrun restarts the group, which resumes from the newest complete
    checkpoint and ends with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = torchrun_cmd(*tiny_cli_args(run_dir, *ARGS), launcher=("--max-restarts=1",))
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fout, stderr=ferr)
    try:
        deadline = time.monotonic() + 120
        killed_at = None
        while killed_at is None:
            assert proc.poll() is None, f"torchrun ended before the kill:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            step = _first_checkpoint(run_dir / "checkpoints")
            if step is not None:
                pid = _worker(proc.pid, KILLED_RANK)
                assert pid is not None, "no first-attempt worker to kill"
                os.kill(pid, signal.SIGKILL)
                killed_at = step
            else:
                time.sleep(0.005)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # torchrun starts each worker in its own session: kill them by pid
            workers = _children(proc.pid)
            proc.kill()
            proc.wait()
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    stderr = err.read_text()
    assert rc == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 2
    assert (run_dir / "model.safetensors").is_file()

    # The first attempt started fresh; the restarted one resumed from a checkpoint of this run dir
    # no older than the one that existed at the kill, and before the end.
    assert "starting;" in stderr
    resumed = re.findall(r"resuming from (\S+step_(\d{8})\.pt) at step (\d+)", stderr)
    assert len(resumed) == 1, stderr[-3000:]
    path, name_step, step = resumed[0]
    assert Path(path).parent == run_dir / "checkpoints"
    assert int(name_step) == int(step) and killed_at <= int(step) < MAX_STEPS and int(step) % EVERY == 0

    # Every step is shown once (the restarted writer purges what the dead attempt logged past the
    # checkpoint) and the curve is the uninterrupted run's.
    losses = read_scalars(str(run_dir))["train/loss"]
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for s in range(1, MAX_STEPS + 1):
        assert losses[s] == pytest.approx(uninterrupted[s], abs=2e-4), s
    assert losses[MAX_STEPS] == pytest.approx(uninterrupted[MAX_STEPS], abs=2e-4)
