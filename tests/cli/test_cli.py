"""The real CLI in a subprocess: a run, signals, and one clear sentence for each bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli, tiny_cli_args


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_cli_trains_and_prints_run_dir(tmp_path):
    proc = run_cli(*tiny_cli_args(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert f"run dir: {tmp_path / 'run'}" in proc.stderr
    for name in ("summary.json", "model.pt", ".hydra", "checkpoints"):
        assert (tmp_path / "run" / name).exists(), name


@pytest.mark.parametrize("override,needles", [
    ("model.d_modle=3", ["d_modle"]),
    ("model.d_model=abc", ["model.d_model", "abc"]),
    ("trainer.max_steps=-1", ["trainer.max_steps=-1", ">= 0"]),
    ("model.num_heads=5", ["model.num_heads=5", "d_model"]),
    ("attention=quantum", ["attention", "quantum", "standard"]),
    ("objective=mlm", ["objective=mlm", "model=decoder"]),
    ("parallel=ddp", ["parallel=ddp", "torchrun"]),
    ("data.files=[/nonexistent/corpus.txt]", ["/nonexistent/corpus.txt"]),
])
def test_bad_input_gets_one_sentence(tmp_path, override, needles):
    args = tiny_cli_args(tmp_path / "run", override)
    if override.startswith("data.files"):
        args.append("data=text")
    proc = run_cli(*args, timeout=120)
    _assert_clean_error(proc, *needles)


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli(*tiny_cli_args(tmp_path / "run", "data=text", f"data.files=[{empty}]"))
    _assert_clean_error(proc, "empty")


def test_corrupt_checkpoint_is_named_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    bad = run_dir / "checkpoints" / "step_00000003.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli(*tiny_cli_args(run_dir))
    _assert_clean_error(proc, "step_00000003.pt", "corrupt")
    assert bad.read_bytes() == b"not a checkpoint"


def test_incompatible_checkpoint_is_named_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*tiny_cli_args(run_dir, "trainer.max_steps=3")).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    proc = run_cli(*tiny_cli_args(run_dir, "trainer.max_steps=6", "model.d_model=64"))
    _assert_clean_error(proc, "incompatible", "model.d_model")
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    assert before == after


def test_sigterm_saves_and_the_run_finishes_on_resume(tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, exit 143; rerunning resumes."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=100000",
                         "trainer.eval_every=100000")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until training has started
        lines.append(line)
        if "starting" in line:
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, "".join(lines) + rest
    assert "SIGTERM" in rest and "Traceback" not in rest
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert stopped_at > 0
    finish = run_cli(*tiny_cli_args(run_dir, f"trainer.max_steps={stopped_at + 4}"))
    assert finish.returncode == 0, finish.stderr
    assert f"resuming from {ckpts[0]} at step {stopped_at}" in finish.stderr
    payload = torch.load(run_dir / "checkpoints" / f"step_{stopped_at + 4:08d}.pt", weights_only=True)
    assert payload["step"] == stopped_at + 4


def test_multirun_sweep_writes_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *[a for a in tiny_cli_args(tmp_path / "unused") if not a.startswith("hydra.run")],
                   "norm=layernorm,rmsnorm", "position=sinusoidal,rope", f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    table = (sweep / "sweep.md").read_text()
    for value in ("norm=rmsnorm", "position=rope", "eval/loss"):
        assert value in table
    assert (sweep / "sweep.csv").read_text().count("\n") == 5
    assert (sweep / "sweep.png").stat().st_size > 1000
