"""Read a sweep dir: one row per job (its overrides, seed, status and summary.json metrics), and
the jobs grouped into configurations (jobs that differ only by `seed`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

# The sweep.csv/sweep.md columns of every job (kept; new columns are appended after them).
COLUMNS = ("status", "eval/loss", "eval/bits_per_byte", "eval/accuracy", "eval/perplexity", "train/loss",
           "tokens_per_sec", "mfu", "peak_memory_mb", "parameters", "setup_time_s", "train_time_s", "wall_time_s", "error")
# summary.json numbers that describe the run rather than measure it: not averaged over seeds.
NOT_METRICS = frozenset({"steps", "tokens", "skipped_steps", "flops_per_token", "peak_flops", "world_size",
                         "eval_step", "exit_code", "eval/blocks", "eval/targets", "complete",
                         "threads", "eval_batches", "latency_batches", "quantized_layers"})
# Override keys that do not make a configuration: the seed is the axis averaged over, and sweep.*
# only says how the report is written.
SEED = "seed"


def override_key(override: str) -> str:
    """`optim.lr` of `optim.lr=1e-3` (also `+key=...`, `++key=...`, `~key`)."""
    return override.lstrip("+~").split("=", 1)[0]


def _not_config(override: str) -> bool:
    key = override_key(override)
    return key == SEED or key == "sweep" or key.startswith("sweep.")


def is_number(v: Any) -> bool:
    """A finite-or-infinite real number (not None, not NaN, not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass
class Configuration:
    """Jobs that differ only by seed: `label` is what distinguishes it from the sweep's other
    configurations (the varied overrides, seed excluded), `jobs` its rows in job order."""

    label: str
    key: tuple[str, ...]
    jobs: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> list[dict]:
        return [j for j in self.jobs if j["status"] == "complete"]

    def values(self, metric: str) -> list[float]:
        """`metric` over this configuration's complete jobs (seeds), in job order."""
        return [float(j["metrics"][metric]) for j in self.complete if is_number(j["metrics"].get(metric))]


def _status(summary: dict | None) -> str:
    if summary is None:
        return "unfinished"
    if "status" in summary:
        return summary["status"]
    return "complete" if summary.get("complete", True) else "paused"


def _read_yaml(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def job_dirs(sweep_dir: str) -> list[str]:
    """The sweep's job dirs: its subdirs holding a summary.json or Hydra's .hydra/overrides.yaml,
    in job-number order."""
    out = []
    for name in os.listdir(sweep_dir):
        path = os.path.join(sweep_dir, name)
        if not name.startswith(".") and os.path.isdir(path) and (
                os.path.isfile(os.path.join(path, "summary.json"))
                or os.path.isfile(os.path.join(path, ".hydra", "overrides.yaml"))):
            out.append(path)
    return sorted(out, key=lambda p: (not os.path.basename(p).isdigit(),
                                      int(os.path.basename(p)) if os.path.basename(p).isdigit() else 0,
                                      os.path.basename(p)))


def _job(path: str) -> dict:
    summary_path = os.path.join(path, "summary.json")
    summary = None
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    overrides = [str(o) for o in (_read_yaml(os.path.join(path, ".hydra", "overrides.yaml")) or [])]
    config = _read_yaml(os.path.join(path, ".hydra", "config.yaml")) or {}
    seeds = [o.split("=", 1)[1] for o in overrides if override_key(o) == SEED and "=" in o]
    seed = config.get("seed", seeds[-1] if seeds else "")
    metrics = {k: v for k, v in (summary or {}).items() if is_number(v) and k not in NOT_METRICS}
    quantized = (summary or {}).get("quantize")  # quantize=<method>: the quantized model's headline numbers
    if isinstance(quantized, dict):
        metrics.update({f"quantize/{k}": v for k, v in quantized.items() if is_number(v) and k not in NOT_METRICS})
    tokens_per_step = math.nan
    if summary and is_number(summary.get("tokens")) and summary.get("steps"):
        tokens_per_step = summary["tokens"] / summary["steps"]
    elif isinstance(config.get("trainer"), dict) and isinstance(config.get("data"), dict):
        tokens_per_step = float(config["trainer"].get("batch_size", 0) * config["data"].get("seq_len", 0))
    row = {"job": os.path.basename(path), "dir": path, "all_overrides": overrides, "seed": seed,
           "metrics": metrics, "tokens_per_step": tokens_per_step,
           "sweep": config.get("sweep") if isinstance(config.get("sweep"), dict) else {}}
    row.update({c: (summary or {}).get(c) for c in COLUMNS})
    row["status"] = _status(summary)
    if summary is None:
        row["error"] = "not finished: the same sweep command resumes it from its last checkpoint"
    return row


def collect(sweep_dir: str) -> list[dict]:
    """One row per job, in job order: `job` (its subdir name), `overrides` (what it varies: the
    overrides every job shares are dropped), `config` (the same without the seed), `seed`, the
    `COLUMNS` from its summary.json, `metrics` (every number summary.json measures), `dir` and
    `tokens_per_step`. A job without a summary.json (stopped or killed) is `unfinished`."""
    rows = [_job(p) for p in job_dirs(sweep_dir)]
    shared = set.intersection(*(set(r["all_overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        varied = [o for o in r["all_overrides"] if o not in shared]
        r["overrides"] = " ".join(varied)
        r["config"] = " ".join(o for o in varied if not _not_config(o))
        r["config_key"] = tuple(sorted(o for o in r["all_overrides"] if not _not_config(o)))
    return rows


def configurations(rows: list[dict]) -> list[Configuration]:
    """The jobs grouped by configuration (every override but the seed), in order of first job."""
    groups: dict[tuple[str, ...], Configuration] = {}
    for r in rows:
        if r["config_key"] not in groups:
            groups[r["config_key"]] = Configuration(label=r["config"] or "all jobs", key=r["config_key"])
        groups[r["config_key"]].jobs.append(r)
    return list(groups.values())


def _same(a: str, b: str) -> bool:
    """Whether overrides `a` and `b` set the same key to the same value (4e-3 equals 0.004, as
    Hydra records it)."""
    (ka, _, va), (kb, _, vb) = a.lstrip("+~").partition("="), b.lstrip("+~").partition("=")
    if ka != kb:
        return False
    try:
        return va == vb or float(va) == float(vb)
    except ValueError:
        return False


def find_baseline(configs: list[Configuration], baseline: str | None) -> Configuration:
    """The configuration `baseline` names (space-separated overrides, each one of the
    configuration's, e.g. "attention=standard"); the first configuration when None or empty.

    Raises ValueError naming the value and the configurations when it matches none or several.
    """
    if not baseline:
        return configs[0]
    wanted = baseline.split()
    found = [c for c in configs if all(any(_same(w, o) for o in c.key) for w in wanted)]
    if len(found) == 1:
        return found[0]
    names = "; ".join(c.label for c in configs)
    how = "matches none" if not found else f"matches {len(found)} ({'; '.join(c.label for c in found)})"
    raise ValueError(f"sweep.baseline={baseline!r} {how} of this sweep's configurations; valid: one "
                     f"configuration's overrides, e.g. {configs[0].label!r} (configurations: {names}).")
