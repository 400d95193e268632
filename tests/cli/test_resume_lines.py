"""Resuming through the real CLI: the printed command continues the run, a finished run says so,
a resume never changes what the checkpoint trained, and one run dir holds one line of training."""
from __future__ import annotations

import os
import shlex
import sys

import pytest

from conftest import ROOT, run_cli, tiny_cli_args
from tb import read_scalars


def _ckpts(run_dir) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(n for n in os.listdir(folder) if n.startswith("step_")) if folder.is_dir() else []


def _pasted(stderr: str, marker: str) -> list[str]:
    """The command after `marker` on its line, as argv (python -> this interpreter)."""
    line = next(ln for ln in stderr.splitlines() if marker in ln)
    argv = shlex.split(line.split(marker, 1)[1].strip())
    assert argv[:3] == ["python", "-m", "trainer"], argv
    return argv[3:]


def test_paused_run_prints_the_command_that_continues_it(tmp_path):
    """A run paused by trainer.steps_per_run prints a command naming its run dir; pasting it (run
    from another directory, where a relative default run dir would differ) finishes the same run,
    and the steps equal an uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    first = run_cli(*tiny_cli_args(run_dir, "trainer.steps_per_run=3", "trainer.log_every=1"))
    assert first.returncode == 0, first.stderr
    args = _pasted(first.stderr, "to continue, run:")
    assert f"hydra.run.dir={run_dir}" in args
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    whole = run_cli(*tiny_cli_args(tmp_path / "whole", "trainer.log_every=1"))
    assert whole.returncode == 0, whole.stderr
    resumed, ref = read_scalars(str(run_dir))["train/loss"], read_scalars(str(tmp_path / "whole"))["train/loss"]
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), step


def test_finished_run_run_again_says_it_is_complete(tmp_path):
    """The same command on a finished run trains nothing, rewrites nothing, adds no event file,
    and says the run is complete with the command that trains it further."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir)
    assert run_cli(*args).returncode == 0
    before = {p: os.path.getmtime(run_dir / p) for p in ("summary.json", "model.pt")}
    events = sorted(n for n in os.listdir(run_dir) if n.startswith("events.out"))
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already complete at step 6" in again.stderr and "trainer.max_steps=12" in again.stderr
    assert {p: os.path.getmtime(run_dir / p) for p in before} == before
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("events.out")) == events


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A run dir paused at step 3 of 6 (the refusal tests below leave it as it is)."""
    run_dir = tmp_path_factory.mktemp("paused") / "run"
    assert run_cli(*tiny_cli_args(run_dir, "trainer.steps_per_run=3")).returncode == 0
    return run_dir


@pytest.mark.parametrize("changed,saved", [
    (["optim.lr=0.01"], ["optim.lr", "0.002"]),
    (["seed=7", "model.dropout=0.2"], ["seed", "model.dropout"]),
    (["data.seq_len=16", "trainer.batch_size=4"], ["data.seq_len", "trainer.batch_size"]),
])
def test_resume_refuses_settings_it_cannot_honour(paused, changed, saved):
    """Resuming with a changed setting that defines the trained line is refused in one sentence
    naming each changed key and the checkpoint's value, before anything in the run dir changes
    (the saved config still says what ran)."""
    run_dir = paused
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    proc = run_cli(*tiny_cli_args(run_dir, *changed))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in saved:
        assert needle in lines[0], (needle, lines[0])
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config
    assert _ckpts(run_dir) == ["step_00000003.pt"]


def test_resume_honours_and_logs_how_often_it_evaluates(tmp_path):
    """Changing only when to evaluate (and how long to train) is honoured and said."""
    run_dir = tmp_path / "run"
    assert run_cli(*tiny_cli_args(run_dir, "trainer.steps_per_run=3")).returncode == 0
    proc = run_cli(*tiny_cli_args(run_dir, "trainer.eval_every=2", "trainer.max_steps=8"))
    assert proc.returncode == 0, proc.stderr
    assert "trainer.eval_every=2 (the checkpoint's: 3)" in proc.stderr
    assert sorted(read_scalars(str(run_dir))["eval/loss"]) == [3, 4, 6, 8]


@pytest.mark.parametrize("keep", [1])
def test_another_runs_checkpoint_is_not_resumed_into_a_dir_with_its_own_line(tmp_path, keep):
    """trainer.resume=<another run's checkpoint> into a run dir that holds a longer line: refused in
    one sentence, and nothing in either dir is removed."""
    old, other = tmp_path / "old", tmp_path / "other"
    common = ["trainer.checkpoint_every=2", f"trainer.keep_checkpoints={keep}"]
    assert run_cli(*tiny_cli_args(old, *common, "trainer.max_steps=8")).returncode == 0
    assert run_cli(*tiny_cli_args(other, *common, "trainer.max_steps=4")).returncode == 0
    before_old, before_other = _ckpts(old), _ckpts(other)
    proc = run_cli(*tiny_cli_args(old, *common, "trainer.max_steps=8",
                                  f"trainer.resume={other / 'checkpoints' / before_other[-1]}"))
    assert proc.returncode == 2 and "another run's line" in proc.stderr, proc.stderr
    assert _ckpts(old) == before_old and _ckpts(other) == before_other


@pytest.mark.parametrize("keep", [2])
def test_resuming_an_older_step_starts_a_new_line_and_keeps_the_old_one_aside(tmp_path, keep):
    """Resuming step 2 of a run dir that holds up to step 8: the newer checkpoints move to a
    superseded_* folder (nothing deleted), rotation keeps only the new line's checkpoints, and a
    later resume=auto continues the new line."""
    run_dir = tmp_path / "run"
    common = ["trainer.checkpoint_every=2", f"trainer.keep_checkpoints={max(keep, 4)}"]
    assert run_cli(*tiny_cli_args(run_dir, *common, "trainer.max_steps=8")).returncode == 0
    assert _ckpts(run_dir)[-1] == "step_00000008.pt"
    common[1] = f"trainer.keep_checkpoints={keep}"
    proc = run_cli(*tiny_cli_args(run_dir, *common, "trainer.max_steps=8", "trainer.steps_per_run=4",
                                  f"trainer.resume={run_dir / 'checkpoints' / 'step_00000002.pt'}"))
    assert proc.returncode == 0, proc.stderr
    aside = [d for d in os.listdir(run_dir / "checkpoints") if d.startswith("superseded")]
    assert len(aside) == 1
    assert sorted(os.listdir(run_dir / "checkpoints" / aside[0])) == [f"step_0000000{s}.pt" for s in (4, 6, 8)]
    kept = _ckpts(run_dir)
    assert kept[-1] == "step_00000006.pt" and len(kept) == min(keep, 3)
    cont = run_cli(*tiny_cli_args(run_dir, *common, "trainer.max_steps=8"))
    assert cont.returncode == 0 and "resuming from" in cont.stderr and "at step 6" in cont.stderr, cont.stderr


def test_two_runs_started_together_get_their_own_run_dirs(tmp_path):
    """Default run dirs (no hydra.run.dir) of two runs started at the same moment differ."""
    import subprocess

    args = [a for a in tiny_cli_args(tmp_path / "x", "trainer.max_steps=1") if not a.startswith("hydra.run.dir")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    runs = [d for day in (tmp_path / "outputs").iterdir() for d in day.iterdir()]
    assert len(runs) == 2 and all((d / "summary.json").is_file() for d in runs)
