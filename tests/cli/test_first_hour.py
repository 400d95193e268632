"""What a new user sees: the closing lines per objective, "did you mean", a warmup that fits the
run, no stray warnings or files, caches where the config says, and zero-step evaluation."""
from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli, tiny_cli_args
from tb import read_scalars


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished tiny run per objective, each with its own cache dir and HOME."""
    out = {}
    base = tmp_path_factory.mktemp("first_hour")
    for name, extra in {"clm": [], "mlm": ["model=encoder"],
                        "contrastive": ["model=encoder", "objective=contrastive", "data=pairs", "data.max_files=60"]
                        }.items():
        run_dir, home, cache = base / name, base / f"home_{name}", base / f"cache_{name}"
        env = {"HOME": str(home), "TRAINER_CACHE": ""}
        proc = run_cli(*tiny_cli_args(run_dir, *extra, f"data.cache_dir={cache}"), env=env)
        assert proc.returncode == 0, proc.stderr
        out[name] = (run_dir, proc, home, cache)
    return out


@pytest.mark.parametrize("name,needles,absent", [
    ("clm", ["eval: loss", "accuracy", "bits/byte", "python -m trainer.generate run_dir=",
             "python -m trainer.evaluate run_dir=", "tensorboard --logdir"], ["recall@1", "trainer.embed"]),
    ("mlm", ["eval: loss", "accuracy", "bits/byte", "python -m trainer.embed run_dir=",
             "python -m trainer.evaluate run_dir="], ["trainer.generate", "recall@1"]),
    ("contrastive", ["recall@1", "recall@10", "MRR@10", "nDCG@10", "BM25 on the same search:",
                     "python -m trainer.embed run_dir="], ["bits/byte", "trainer.generate"]),
])
def test_closing_lines_show_the_objectives_headline_metrics_and_next_commands(runs, name, needles, absent):
    """The closing lines carry the metrics the objective is judged by, each equal to summary.json's
    value as printed, and the commands that apply to this run."""
    run_dir, proc, _, _ = runs[name]
    tail = proc.stderr[proc.stderr.index(f"run dir: {run_dir}"):]
    for needle in needles:
        assert needle in tail, (needle, tail)
    for needle in absent:
        assert needle not in tail, (needle, tail)
    summary = json.loads((run_dir / "summary.json").read_text())
    if name == "contrastive":
        assert f"recall@10 {summary['eval/recall@10']:.3f}" in tail
        assert f"recall@10 {summary['bm25/recall@10']:.3f}" in tail.split("BM25 on the same search:")[1]
    else:
        assert f"bits/byte {summary['eval/bits_per_byte']:.3f}" in tail


@pytest.mark.parametrize("name", ["clm", "contrastive"])
def test_a_plain_run_prints_no_warning_and_leaves_no_empty_file(runs, name):
    run_dir, proc, _, _ = runs[name]
    assert "warning" not in proc.stderr.lower(), proc.stderr
    empty = [str(p) for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert not empty, empty
    assert len([n for n in os.listdir(run_dir) if n.startswith("events.out")]) == 1


def test_caches_go_where_the_config_says(runs):
    """The measured FLOP/s peak is cached under data.cache_dir, nothing under ~/.cache/trainer."""
    _, _, home, cache = runs["clm"]
    assert (cache / "peak_flops.json").is_file()
    assert not (home / ".cache" / "trainer").exists()


@pytest.mark.parametrize("arg,suggestion", [
    ("trainer.max_step=10", "did you mean trainer.max_steps?"),
    ("model.d_modl=64", "did you mean model.d_model?"),
    ("optim.weight_decy=0.1", "did you mean optim.weight_decay?"),
    ("attention=flsh", "did you mean flash?"),
    ("norm=rmsnrm", "did you mean rmsnorm?"),
])
def test_a_misspelt_key_or_option_suggests_the_nearest(tmp_path, arg, suggestion):
    proc = run_cli(*tiny_cli_args(tmp_path / "run", arg))
    assert proc.returncode == 2 and suggestion in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_warmup_is_a_fraction_of_the_run_and_a_whole_run_warmup_is_said(tmp_path):
    """schedule.warmup_fraction (the default, 0.1) sizes warmup from trainer.max_steps: a 20-step
    run warms up over steps 1-2 (lr = peak x 1/2, x 2/2), then decays, and a warmup as long as the run is said."""
    run_dir = tmp_path / "frac"
    args = [a for a in tiny_cli_args(run_dir, "trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=20",
                                     "optim.lr=0.001", "schedule.min_lr_ratio=0.0") if "warmup_steps" not in a]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    lr = read_scalars(str(run_dir))["train/lr"]
    assert lr[1] == pytest.approx(0.0005) and lr[2] == pytest.approx(0.001)
    assert lr[3] == pytest.approx(0.001) and lr[4] < 0.001  # cosine starts from the peak after warmup
    assert "covers the whole run" not in proc.stderr
    whole = run_cli(*tiny_cli_args(tmp_path / "whole", "schedule.warmup_steps=50"))
    assert whole.returncode == 0 and "covers the whole run of 6 steps" in whole.stderr, whole.stderr


def test_zero_steps_evaluates_the_starting_weights(tmp_path, runs):
    """trainer.max_steps=0 trains nothing and reports the held-out metrics of the starting weights:
    from model.init_from, the same eval/loss that run ended with, and init_from is recorded."""
    src = runs["clm"][0]
    run_dir = tmp_path / "zero"
    proc = run_cli(*tiny_cli_args(run_dir, "trainer.max_steps=0", f"model.init_from={src}"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((src / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["init_from"] == str(src)
    assert summary["eval/loss"] == pytest.approx(ref["eval/loss"], abs=1e-6)
    assert f"started from: {src}" in proc.stderr
