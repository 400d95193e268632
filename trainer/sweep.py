"""Hydra callback: after a multirun, collect every job's summary.json into sweep.md/.csv/.png."""
from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("status", "eval/loss", "eval/bits_per_byte", "eval/accuracy", "eval/perplexity", "train/loss",
           "tokens_per_sec", "mfu", "peak_memory_mb", "parameters", "setup_time_s", "train_time_s", "wall_time_s", "error")


def _status(summary: dict) -> str:
    if "status" in summary:
        return summary["status"]
    return "complete" if summary.get("complete", True) else "paused"


def collect(sweep_dir: str) -> list[dict]:
    """One row per job: its overrides plus the summary metrics."""
    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "summary.json"))):
        job_dir = os.path.dirname(path)
        with open(path) as f:
            summary = json.load(f)
        overrides_file = os.path.join(job_dir, ".hydra", "overrides.yaml")
        overrides: list[str] = []
        if os.path.exists(overrides_file):
            import yaml

            with open(overrides_file) as f:
                overrides = yaml.safe_load(f) or []
        rows.append({"job": os.path.basename(job_dir), "overrides": overrides,
                     **{c: summary.get(c) for c in COLUMNS}, "status": _status(summary)})
    # Show what the sweep varied: overrides shared by every job are dropped from the table.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in shared)
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v  # not None, not NaN


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_report(sweep_dir: str) -> list[dict]:
    """Write sweep.csv, sweep.md (sorted by eval/loss) and sweep.png; returns the rows."""
    rows = collect(sweep_dir)
    if not rows:
        return rows
    # Best eval/loss first; jobs without one (failed, paused, non-finite) last, in job order.
    rows.sort(key=lambda r: (not _is_number(r["eval/loss"]), r["eval/loss"] if _is_number(r["eval/loss"]) else 0.0,
                             int(r["job"]) if str(r["job"]).isdigit() else 0))
    keys = ["job", "overrides", *COLUMNS]
    with open(os.path.join(sweep_dir, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]).replace("|", "\\|") for k in keys) + " |" for r in rows]
    failed = sum(r["status"] == "failed" for r in rows)
    note = f"\n{failed} of {len(rows)} job(s) failed; their reason is in the error column.\n" if failed else ""
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write("# Sweep results (best eval/loss first)\n\n" + "\n".join(lines) + "\n" + note)
    _plot(rows, os.path.join(sweep_dir, "sweep.png"))
    return rows


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return
    labels = [r["overrides"] or r["job"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2))
    for ax, key in zip(axes, ("eval/loss", "tokens_per_sec")):
        ax.barh(labels, [r[key] if _is_number(r[key]) else 0.0 for r in rows])
        ax.set_xlabel(key)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepReport(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_report(config.hydra.sweep.dir)
        if rows:
            print(f"sweep report: {os.path.join(config.hydra.sweep.dir, 'sweep.md')}")
