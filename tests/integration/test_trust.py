"""Numbers that do not depend on process history, logs that tell the truth, safe loading.

Each test asserts a reference value: equal losses across processes, each step once in
TensorBoard, the lr Adam actually applied, the held-out loss recomputed independently.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_cli, tiny_cli_args
from tb import read_scalar_events, read_scalars
from trainer.run import run

DROPOUT = ["model.dropout=0.1", "trainer.log_every=1", "trainer.eval_every=4", "trainer.checkpoint_every=4"]


def _losses(run_dir) -> dict[int, float]:
    return read_scalars(str(run_dir))["train/loss"]


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_resume_in_a_new_process_is_exact(tmp_path, arch):
    """An interrupted run resumed in a *separate process* (so one-time work such as the FLOPs
    probe happens again after the restore) logs exactly the uninterrupted run's losses, with
    dropout drawing from the global RNG at every step."""
    args = [*DROPOUT, f"model={arch}", "trainer.max_steps=8"]
    full = run_cli(*tiny_cli_args(tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr
    first = run_cli(*tiny_cli_args(tmp_path / "split", *args, "trainer.steps_per_run=5"))
    assert first.returncode == 0, first.stderr
    assert "paused at step 5 of 8" in first.stderr and "nan" not in first.stderr
    second = run_cli(*tiny_cli_args(tmp_path / "split", *args))
    assert second.returncode == 0, second.stderr
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    ea, eb = (read_scalars(str(tmp_path / d))["eval/loss"] for d in ("full", "split"))
    assert eb == pytest.approx(ea, abs=1e-6)


def test_changed_max_steps_on_resume_is_announced(tmp_path):
    base = tiny_cli_args(tmp_path / "run", "trainer.max_steps=6", "trainer.steps_per_run=3")
    assert run_cli(*base).returncode == 0
    proc = run_cli(*tiny_cli_args(tmp_path / "run", "trainer.max_steps=9"))
    assert proc.returncode == 0, proc.stderr
    assert "trainer.max_steps changed from 6" in proc.stderr and "to 9" in proc.stderr


def test_resume_from_an_older_checkpoint_logs_each_step_once(make_cfg, tmp_path):
    """Resuming from step 4 of a run that reached step 8: TensorBoard (its own reader over the run
    dir) shows steps 1..8 once each, with the values of the resumed run for steps 5..8."""
    cfg = make_cfg("trainer.max_steps=8", "trainer.log_every=1", "trainer.checkpoint_every=4",
                   "trainer.keep_checkpoints=3", "model.dropout=0.1")
    run(cfg, run_dir=str(tmp_path))
    before = _losses(tmp_path)
    run(make_cfg("trainer.max_steps=8", "trainer.log_every=1", "trainer.checkpoint_every=4",
                 "trainer.keep_checkpoints=3", "model.dropout=0.1",
                 f"trainer.resume={tmp_path / 'checkpoints' / 'step_00000004.pt'}"), run_dir=str(tmp_path))
    events = read_scalar_events(str(tmp_path))
    steps = [s for s, _ in events["train/loss"]]
    assert sorted(steps) == list(range(1, 9)), steps
    assert _losses(tmp_path) == pytest.approx(before, abs=1e-6)  # exact resume: same values again


def test_logged_lr_is_the_lr_the_update_used(make_cfg, tmp_path):
    """Adam's first update moves every weight with a non-zero gradient by lr (times g/(|g|+eps)):
    with lr 2e-3 and 5 warmup steps, step 1 used 4e-4, and so says train/lr."""
    cfg = make_cfg("trainer.max_steps=1", "trainer.log_every=1", "optim.lr=2e-3", "schedule.warmup_steps=5",
                   "optim.weight_decay=0", "trainer.grad_clip=0")
    run(cfg, run_dir=str(tmp_path))
    logged = read_scalars(str(tmp_path))["train/lr"][1]
    assert logged == pytest.approx(4e-4, rel=1e-6)
    from models.build import build_model
    from trainer.runs.process import seed_all as _seed_all

    _seed_all(cfg.seed)
    init = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384,
                       max_len=cfg.data.seq_len).state_dict()
    final = torch.load(tmp_path / "model.pt")
    moved = (final["decoder.blocks.0.ffn.up.weight"] - init["decoder.blocks.0.ffn.up.weight"]).abs()
    assert moved.max().item() == pytest.approx(logged, rel=1e-3)


def test_eval_loss_is_the_loss_on_the_whole_held_out_split(make_cfg, tmp_path):
    """With eval_batches x batch_size >= the validation blocks, eval/loss is the mean next-token
    loss over every held-out block, recomputed here from model.pt; with fewer, it is the loss on
    the blocks `eval_indices` names, which reach the end of the split."""
    from models.build import build_model
    from trainer.data import load_corpus
    from trainer.data.heldout import eval_indices

    cfg = make_cfg("trainer.max_steps=4", "trainer.eval_every=4", "trainer.eval_batches=1000")
    summary = run(cfg, run_dir=str(tmp_path))
    val = load_corpus(cfg.data, cfg.seed).val
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=cfg.data.seq_len)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    model.eval()

    def mean_ce(blocks: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(blocks[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()

    assert summary["eval/blocks"] == len(val)
    assert summary["eval/loss"] == pytest.approx(mean_ce(val), abs=1e-5)
    # A sample of 2 x 8 blocks: spread over the split, the same whichever step evaluates it.
    idx = eval_indices(len(val), 8, 2)
    assert len(idx) == 16 and idx[-1] >= len(val) * 15 // 16 and idx[0] < len(val) // 16
    summary2 = run(make_cfg("trainer.max_steps=4", "trainer.eval_every=4", "trainer.eval_batches=2"),
                   run_dir=str(tmp_path / "sample"))
    model.load_state_dict(torch.load(tmp_path / "sample" / "model.pt"))
    assert summary2["eval/loss"] == pytest.approx(mean_ce(val[idx]), abs=1e-5)


def test_each_run_reports_its_own_peak_memory_and_time_split(make_cfg, tmp_path):
    """A 1.5 GB allocation earlier in the process does not show up as this run's peak."""
    big = torch.ones(400_000_000)  # 1.6 GB, touched
    big += 1
    del big
    summary = run(make_cfg(), run_dir=str(tmp_path))
    assert 0 < summary["peak_memory_mb"] < 1200, summary["peak_memory_mb"]
    assert summary["setup_time_s"] > 0 and summary["train_time_s"] > 0
    assert summary["setup_time_s"] + summary["train_time_s"] <= summary["wall_time_s"] + 1e-6


def test_a_run_does_not_depend_on_what_ran_before_it(make_cfg, tmp_path):
    """The same config twice in one process, with global RNG draws in between: identical losses."""
    args = ["model.dropout=0.1", "trainer.log_every=1"]
    run(make_cfg(*args), run_dir=str(tmp_path / "a"))
    torch.rand(1000), torch.randn(17)
    import random

    import numpy as np

    random.random(), np.random.rand(3)
    run(make_cfg(*args), run_dir=str(tmp_path / "b"))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_peak_flops_probe_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    from trainer import flops

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr(flops, "_PROBED", {})
    before = torch.get_rng_state()
    assert flops.peak_flops(torch.device("cpu"), "fp32") > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_peak_flops_keeps_the_best_of_five_probes_then_stops_probing(tmp_path, monkeypatch):
    """Each process probes (its own `_PROBED` empty) until five probes are recorded in the cache;
    the best is kept, so a probe taken on a busy machine does not stick, and later processes
    start without the probe. A cache written before the probe count existed counts as one."""
    from trainer import flops

    measured = iter([3.0, 5.0, 1.0, 2.0, 4.0, 99.0])
    calls = []
    monkeypatch.setattr(flops, "_probe", lambda *a, **k: calls.append(1) or next(measured))
    got = []
    for _ in range(6):
        monkeypatch.setattr(flops, "_PROBED", {})  # a new process
        got.append(flops.peak_flops(torch.device("cpu"), "fp32", str(tmp_path)))
    assert got == [3.0, 5.0, 5.0, 5.0, 5.0, 5.0] and len(calls) == 5
    key = next(iter(json.loads((tmp_path / "peak_flops.json").read_text())))
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 7.0}))  # the older format
    monkeypatch.setattr(flops, "_PROBED", {})
    measured = iter([6.0])
    assert flops.peak_flops(torch.device("cpu"), "fp32", str(tmp_path)) == 7.0 and len(calls) == 6


def test_sweep_records_a_failed_job_runs_the_rest_and_matches_solo_runs(tmp_path):
    """model.num_heads=4,5,2: job 1 is refused in one sentence, job 2 still runs and its losses
    equal the same overrides run alone in a fresh process; the report's rows are each job's
    summary.json, best eval/loss first; the exit code says a job failed."""
    sweep = tmp_path / "sweep"
    common = [a for a in tiny_cli_args(tmp_path / "unused", "model.dropout=0.1", "trainer.log_every=1")
              if not a.startswith("hydra.run")]
    proc = run_cli("-m", *common, "model.num_heads=4,5,2", f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "1 sweep job(s) failed" in proc.stderr and "model.num_heads=5 must divide" in proc.stderr
    solo = run_cli(*common, "model.num_heads=2", f"hydra.run.dir={tmp_path / 'solo'}")
    assert solo.returncode == 0, solo.stderr
    assert _losses(sweep / "2") == _losses(tmp_path / "solo")  # exact, process history excluded
    import csv

    with open(sweep / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows][-1] == "1" and rows[-1]["status"] == "failed"
    assert "must divide" in rows[-1]["error"]
    done = [r for r in rows if r["status"] == "complete"]
    assert [float(r["eval/loss"]) for r in done] == sorted(float(r["eval/loss"]) for r in done)
    for r in done:
        summary = json.loads((sweep / r["job"] / "summary.json").read_text())
        for key in ("eval/loss", "train/loss", "tokens_per_sec", "peak_memory_mb", "parameters", "wall_time_s"):
            assert float(r[key]) == pytest.approx(summary[key], rel=1e-9), key
    assert "failed" in (sweep / "sweep.md").read_text()


def _crafted(path, marker) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        pickle.dump({"format": 1, "model": Payload()}, f)


@pytest.mark.parametrize("where", ["run_dir", "resume_path"])
def test_a_crafted_checkpoint_does_not_run_code(tmp_path, where):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    bad = run_dir / "checkpoints" / "step_00000003.pt"
    if where == "resume_path":
        bad = tmp_path / "elsewhere.pt"
    _crafted(bad, marker)
    content = bad.read_bytes()
    extra = [f"trainer.resume={bad}"] if where == "resume_path" else []
    proc = run_cli(*tiny_cli_args(run_dir, *extra))
    assert proc.returncode == 2, proc.stderr
    assert not marker.exists(), "loading the checkpoint executed code"
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(bad) in lines[-1] and "Traceback" not in proc.stderr
    assert bad.read_bytes() == content


def test_stdout_log_has_plain_lines_not_progress_frames(tmp_path):
    """stderr is a pipe here, not a terminal: one plain line per trainer.log_every, no '\\r'."""
    proc = run_cli(*[a for a in tiny_cli_args(tmp_path / "run") if a != "trainer.progress=false"],
                   "trainer.progress=true", "trainer.max_steps=6", "trainer.log_every=2")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("step ") and "/6" in line]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], proc.stderr


def test_sigterm_during_evaluation_saves_without_finishing_it(tmp_path):
    """A stop request that arrives during an evaluation ends it: the step's checkpoint is saved at
    once, no eval/loss is logged for that step, exit 143."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, "trainer.max_steps=1000", "trainer.eval_every=2", "trainer.eval_batches=100000",
                         "trainer.checkpoint_every=100000", "data.max_files=120", "trainer.batch_size=2")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 2:") or "eval/loss" in line:
            break  # the first evaluation finished: the second one (step 4) is next
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, "".join(seen) + rest
    stopped = sorted((run_dir / "checkpoints").iterdir())[-1]
    step = int(stopped.stem.split("_")[1])
    evals = read_scalars(str(run_dir)).get("eval/loss", {})
    assert step not in evals, (step, evals)


def test_resume_after_a_crash_past_the_last_checkpoint_logs_each_step_once(make_cfg, tmp_path):
    """A run that logged steps 1..7 but whose last complete checkpoint is step 4 (as after a crash):
    resuming logs 5..8 again and TensorBoard shows each step once, the resumed values winning."""
    args = ["trainer.max_steps=8", "trainer.log_every=1", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=5"]
    run(make_cfg(*args, "trainer.steps_per_run=7"), run_dir=str(tmp_path))
    os.remove(tmp_path / "checkpoints" / "step_00000007.pt")  # the crash: step 7's save never happened
    run(make_cfg(*args), run_dir=str(tmp_path))
    steps = [s for s, _ in read_scalar_events(str(tmp_path))["train/loss"]]
    assert sorted(steps) == list(range(1, 9)), steps
    full = tmp_path / "full"
    run(make_cfg(*args), run_dir=str(full))
    assert _losses(tmp_path) == pytest.approx(_losses(full), abs=1e-6)
