"""Sweeps through the CLI: seeds grouped into configurations with means, deviations and Welch
intervals equal to a hand computation from the jobs' summary.json; a stopped sweep resumed by the
same command; the joblib and submitit launchers giving the basic launcher's report; the report
rebuilt by `python -m trainer.sweep` equal to the one written at the end of the sweep."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TINY, run_cli
from tests.tb import read_accumulator, read_scalars

# One torch thread in every sweep here: the launchers' jobs then sum in the same order as the
# basic launcher's, so their numbers compare exactly.
ARGS = [*TINY, "trainer.threads=1"]
GRID = ["optim.lr=1e-3,4e-3", "seed=0,1"]
METRICS = ("eval/loss", "eval/accuracy", "eval/bits_per_byte", "train/loss")
REPORT = ("sweep.md", "sweep.csv", "sweep_stats.csv", "sweep_curves.csv")
# Student's t 0.975 quantiles as printed in published tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}


def _sweep(sweep_dir, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli("-m", *ARGS, *args, f"hydra.sweep.dir={sweep_dir}", timeout=timeout)


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _jobs(sweep_dir) -> dict[str, dict]:
    """job -> {overrides, summary} read straight from the job dirs."""
    out = {}
    for name in sorted(os.listdir(sweep_dir)):
        summary = sweep_dir / name / "summary.json"
        if summary.is_file():
            out[name] = {"overrides": yaml.safe_load((sweep_dir / name / ".hydra" / "overrides.yaml").read_text()),
                         "summary": json.loads(summary.read_text())}
    return out


def _t_cdf(t: float, df: float, n: int = 4000) -> float:
    """Student's t distribution function by Simpson's rule on its density (a reference computed
    another way than the report's incomplete-beta inversion)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = [c * (1 + (t * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + t / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """A 2-configuration x 2-seed sweep run by Hydra's basic launcher."""
    sweep = tmp_path_factory.mktemp("basic") / "sweep"
    proc = _sweep(sweep, *GRID)
    assert proc.returncode == 0, proc.stderr
    return sweep


def test_t_quantile_matches_published_tables():
    from trainer.sweeps.stats import t_quantile, welch

    for df, value in T_TABLE.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4), df
    assert t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=5e-6)
    one = welch([1.0], [2.0, 3.0])
    assert one.diff == -1.5 and not one.defined and not one.excludes_zero  # n=1: undefined


def test_report_equals_a_hand_computation_from_the_jobs(basic):
    """Per configuration (jobs differing only by seed): n, mean and standard deviation of each
    metric, and the difference from the baseline (the first configuration) with its 95% Welch
    interval, exactly as computed here from each job's summary.json."""
    jobs = _jobs(basic)
    assert len(jobs) == 4
    by_lr: dict[str, list[dict]] = {}
    for job in jobs.values():
        lr = next(o for o in job["overrides"] if o.startswith("optim.lr="))
        by_lr.setdefault(lr, []).append(job["summary"])
    base, other = sorted(by_lr, key=lambda lr: float(lr.split("=")[1]))  # 1e-3 is the first configuration
    stats = {(r["config"], r["metric"]): r for r in _csv(basic / "sweep_stats.csv")}
    for metric in METRICS:
        a = [s[metric] for s in by_lr[other]]
        b = [s[metric] for s in by_lr[base]]
        for lr, values in ((base, b), (other, a)):
            row = stats[(lr, metric)]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(statistics.mean(values), rel=1e-12, abs=1e-15)
            assert float(row["sd"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
        row = stats[(other, metric)]
        va, vb = statistics.variance(a) / 2, statistics.variance(b) / 2
        df = (va + vb) ** 2 / (va ** 2 + vb ** 2)  # Welch–Satterthwaite with n = 2 on both sides
        diff = statistics.mean(a) - statistics.mean(b)
        assert row["baseline"] == base
        assert float(row["diff"]) == pytest.approx(diff, rel=1e-12, abs=1e-15)
        if va + vb == 0:
            continue
        assert float(row["df"]) == pytest.approx(df, rel=1e-9)
        q = float(row["ci95_half"]) / math.sqrt(va + vb)  # the report's t quantile
        assert _t_cdf(q, df) == pytest.approx(0.975, abs=1e-7), metric
        assert 1 <= df <= 2 and T_TABLE[2] <= q <= T_TABLE[1]  # between the published df=1 and 2 values
        assert float(row["ci95_low"]) == pytest.approx(diff - float(row["ci95_half"]), rel=1e-12)
        assert row["excludes_zero"] == str(abs(diff) > float(row["ci95_half"]))
    md = (basic / "sweep.md").read_text()
    assert f"| {other} buys " in md and "Welch" in md and "| baseline |" in md
    # Curves: each configuration's eval/loss mean over its seeds at every evaluated step.
    curves = _csv(basic / "sweep_curves.csv")
    for lr in (base, other):
        dirs = [basic / j for j, job in jobs.items() if lr in job["overrides"]]
        per_job = [read_scalars(str(d))["eval/loss"] for d in dirs]
        rows = [r for r in curves if r["config"] == lr]
        assert [int(r["step"]) for r in rows] == [3, 6]
        for r in rows:
            step = int(r["step"])
            assert float(r["eval/loss mean"]) == pytest.approx(statistics.mean(c[step] for c in per_job), rel=1e-12)
            assert float(r["tokens"]) == step * 8 * 32  # batch 8 x 32 tokens per step
    assert (basic / "sweep.png").stat().st_size > 1000
    # Per-job rows keep their columns and add the configuration and seed.
    rows = _csv(basic / "sweep.csv")
    assert {(r["config"], r["seed"]) for r in rows} == {(lr, s) for lr in (base, other) for s in ("0", "1")}
    # The HParams tab of each job holds its overrides (the keys a sweep varies), typed.
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = read_accumulator(str(basic / "3")).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["trainer.max_steps"].number_value == 6 and hparams["schedule.warmup_steps"].number_value == 2
    assert hparams["seed"].number_value == 1 and hparams["optim.lr"].number_value == pytest.approx(4e-3)


def test_report_rebuilt_from_the_sweep_dir_equals_the_one_written_at_the_end(basic):
    written = {name: (basic / name).read_text() for name in REPORT}
    for name in (*REPORT, "sweep.png"):
        (basic / name).unlink()
    proc = run_cli(str(basic), module="trainer.sweep", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {name: (basic / name).read_text() for name in REPORT} == written
    assert (basic / "sweep.png").stat().st_size > 1000
    bad = run_cli(str(basic), "sweep.baseline=optim.lr=0.5", module="trainer.sweep", timeout=120)
    assert bad.returncode == 2 and "sweep.baseline='optim.lr=0.5' matches none" in bad.stderr
    assert {name: (basic / name).read_text() for name in REPORT} == written  # nothing rewritten


def test_a_stopped_sweep_resumes_with_the_same_command(tmp_path):
    """SIGTERM during job 2 (jobs 0 and 1 done) ends the sweep with job 2 checkpointed; the same
    command then skips jobs 0-1 (summary.json untouched), resumes job 2 from its checkpoint and
    runs job 3, and the report covers all four. Another command into that sweep dir is refused."""
    sweep = tmp_path / "sweep"
    args = ["-m", *ARGS, "trainer.progress=true", "trainer.eval_every=100", "trainer.checkpoint_every=100",
            "trainer.max_steps=6,300", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 2/300"):  # job 2 is training
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, "".join(seen) + rest
    rows = {r["job"]: r for r in _csv(sweep / "sweep.csv")}
    assert [rows[j]["status"] for j in "012"] == ["complete", "complete", "unfinished"]
    assert not (sweep / "3").exists()
    stopped_at = int(sorted(os.listdir(sweep / "2" / "checkpoints"))[-1][5:13])
    before = {j: ((sweep / j / "summary.json").read_bytes(), (sweep / j / "summary.json").stat().st_mtime_ns)
              for j in "01"}
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr
    after = {j: ((sweep / j / "summary.json").read_bytes(), (sweep / j / "summary.json").stat().st_mtime_ns)
             for j in "01"}
    assert after == before
    assert f"resuming from {sweep / '2' / 'checkpoints'}" in again.stderr and f"at step {stopped_at}" in again.stderr
    assert again.stderr.count("is already complete") == 2
    jobs = _jobs(sweep)
    assert [jobs[j]["summary"]["steps"] for j in "0123"] == [6, 6, 300, 300]
    rows = _csv(sweep / "sweep.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"] and {r["status"] for r in rows} == {"complete"}
    stats = {(r["config"], r["metric"]): r for r in _csv(sweep / "sweep_stats.csv")}
    assert int(stats[("trainer.max_steps=300", "eval/loss")]["n"]) == 2
    other = run_cli("-m", *ARGS, "trainer.max_steps=6,300", "seed=0,1,2", f"hydra.sweep.dir={sweep}")
    assert other.returncode == 2 and "holds a sweep of other overrides" in other.stderr, other.stderr
    assert not (sweep / "4").exists() and _jobs(sweep) == jobs


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_give_the_basic_launchers_report(tmp_path, basic, launcher):
    plugin = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}
    if importlib.util.find_spec(plugin[launcher]) is None:
        pytest.skip(f"{launcher} launcher not installed (pip install -e '.[launchers]')")
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    proc = _sweep(sweep, f"hydra/launcher={launcher}", *extra, "optim.lr=1e-3", "seed=0,1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    mine = {tuple(j["overrides"]): j["summary"] for j in _jobs(sweep).values()}
    theirs = {tuple(j["overrides"]): j["summary"] for j in _jobs(basic).values()}
    assert len(mine) == 2 and set(mine) <= set(theirs)
    for overrides, summary in mine.items():
        assert {m: summary[m] for m in METRICS} == {m: theirs[overrides][m] for m in METRICS}
    # The report (written by the launching process once both jobs ended) equals the basic one's
    # rows for that configuration.
    stats = {r["metric"]: r for r in _csv(sweep / "sweep_stats.csv")}
    base = {r["metric"]: r for r in _csv(basic / "sweep_stats.csv") if r["config"] == "optim.lr=0.001"}
    for m in METRICS:
        assert (stats[m]["n"], stats[m]["mean"], stats[m]["sd"]) == (base[m]["n"], base[m]["mean"], base[m]["sd"])


def test_parallel_jobs_share_the_cores():
    from omegaconf import OmegaConf

    from trainer.sweeps.launch import job_threads

    def joblib(**kw):
        return OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                                 "n_jobs": -1, "prefer": "processes", "require": None, "backend": None, **kw})

    assert job_threads(joblib(n_jobs=4), cores=16) == 4
    assert job_threads(joblib(n_jobs=-1), cores=16) == 1  # one job per core
    assert job_threads(joblib(n_jobs=-2), cores=16) == 1 and job_threads(joblib(n_jobs=3), cores=16) == 5
    assert job_threads(joblib(n_jobs=1), cores=16) is None  # joblib runs it in this process
    assert job_threads(joblib(n_jobs=4, prefer="threads"), cores=16) is None
    submitit = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                "cpus_per_task": None}
    assert job_threads(submitit, cores=16, env={}) is None
    assert job_threads({**submitit, "cpus_per_task": 3}, cores=16, env={}) == 3
    assert job_threads(submitit, cores=16, env={"SLURM_CPUS_PER_TASK": "6"}) == 6
    assert job_threads({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, cores=16) is None


def test_optuna_search_returns_the_sweep_metric_and_reports_every_trial(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("optuna sweeper not installed (pip install -e '.[search]')")
    sweep = tmp_path / "search"
    args = [a for a in ARGS if not a.startswith("schedule.warmup_steps")]
    proc = run_cli("-m", *args, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                   "optim.lr=tag(log,interval(1e-4,1e-2))", "schedule.warmup_steps=range(0,4)",
                   f"hydra.sweep.dir={sweep}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(j["summary"]["eval/loss"] for j in jobs.values())  # what each job returned
    stats = [r for r in _csv(sweep / "sweep_stats.csv") if r["metric"] == "eval/loss"]
    assert sorted(r["jobs"] for r in stats) == ["0", "1", "2"] and {r["n"] for r in stats} == {"1"}
    assert "undefined (n=1" in (sweep / "sweep.md").read_text()
