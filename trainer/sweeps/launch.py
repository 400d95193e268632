"""What a sweep checks when it starts, and what each of its jobs takes.

- The same command into the same `hydra.sweep.dir` resumes a sweep: Hydra numbers the jobs in the
  order of the command's overrides, and each job's run dir `<sweep dir>/<job num>` keeps its
  checkpoints and summary.json. Another command into that dir would give those numbers other
  jobs, so it is refused before any job runs (`different_sweep`).
- Jobs run at once by a parallel launcher share the machine's cores: each takes cores / N torch
  threads unless `trainer.threads` is set (`job_threads`).
"""
from __future__ import annotations

import os
from typing import Any

import yaml

MULTIRUN_FILE = "multirun.yaml"  # written by Hydra's sweeper into the sweep dir when a sweep starts


def different_sweep(sweep_dir: str, task_overrides: list[str]) -> str | None:
    """One sentence when `sweep_dir` already holds a sweep started with other overrides than
    `task_overrides` (the command's, e.g. ["optim.lr=1e-3,3e-3", "seed=0,1"]); None when it is new
    or the same sweep. Launcher and other hydra.* overrides may differ (they are not the task's)."""
    path = os.path.join(sweep_dir, MULTIRUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    before = (((saved.get("hydra") or {}).get("overrides") or {}).get("task")) or []
    before, now = [str(o) for o in before], [str(o) for o in task_overrides]
    if before == now:
        return None
    had = " ".join(o for o in before if o not in now) or "the same overrides in another order"
    has = " ".join(o for o in now if o not in before) or "the same overrides in another order"
    return (f"hydra.sweep.dir={sweep_dir} holds a sweep of other overrides (it had {had}; this command has "
            f"{has}), and its job numbers would name other jobs: run that sweep's own command to resume it, "
            f"or give this one a new hydra.sweep.dir.")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_threads(launcher: Any, cores: int | None = None, env: dict | None = None) -> int | None:
    """Torch threads for one job of a sweep run by `launcher` (the `hydra.launcher` config node), or
    None to keep torch's default.

    joblib (processes): n_jobs at once share `cores`, so cores // n_jobs each (n_jobs=-1: every
    core, -2: all but one, as joblib counts; the same share joblib's own workers get). submitit
    (local or SLURM): hydra.launcher.cpus_per_task, else $SLURM_CPUS_PER_TASK. Other launchers run
    one job at a time in this process: None.
    """
    cores = cores or _cores()
    env = os.environ if env is None else env
    target = str(_get(launcher, "_target_") or "")
    if "joblib" in target:
        if _get(launcher, "prefer") == "threads" or _get(launcher, "require") == "sharedmem" \
                or _get(launcher, "backend") in ("threading", "sequential"):
            return None  # threads of one process: torch's thread count is shared, not per job
        n_jobs = int(_get(launcher, "n_jobs") or 1)
        running = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        return max(1, cores // running) if running > 1 else None
    if "submitit" in target:
        cpus = _get(launcher, "cpus_per_task") or env.get("SLURM_CPUS_PER_TASK")
        return int(cpus) if cpus else None
    return None


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    if isinstance(node, dict):
        return node.get(key)
    return node.get(key) if hasattr(node, "get") else getattr(node, key, None)
