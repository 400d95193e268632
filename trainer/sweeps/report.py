"""The sweep report, a function of the sweep dir alone (whichever launcher ran the jobs):

- sweep.csv: one row per job (best eval/loss first), its varied overrides, the summary columns,
  then its configuration and seed;
- sweep_stats.csv: one row per configuration and metric: n, mean, standard deviation, and the
  difference from the baseline configuration with its 95% Welch interval;
- sweep_curves.csv: each configuration's eval-loss curve (mean and sd over seeds per step);
- sweep.md: the jobs table, then per headline metric "X buys Y ± Z" against the baseline;
- sweep.png: the curves beside the final-metric bars.
"""
from __future__ import annotations

import csv
import math
import os

from trainer.sweeps.collect import COLUMNS, Configuration, collect, configurations, find_baseline, is_number
from trainer.sweeps.curves import config_curve
from trainer.sweeps.plot import write_plot
from trainer.sweeps.stats import CONFIDENCE, mean_sd, welch

JOB_KEYS = ("job", "overrides", *COLUMNS, "config", "seed")
STAT_KEYS = ("config", "n", "jobs", "metric", "mean", "sd", "baseline", "diff", "ci95_low", "ci95_high",
             "ci95_half", "df", "excludes_zero")
CURVE_KEYS = ("config", "n", "step", "tokens", "eval/loss mean", "eval/loss sd")
HEADLINE = ("eval/loss", "eval/bits_per_byte", "eval/accuracy", "tokens_per_sec")
DEFAULT_METRIC = "eval/loss"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _pm(value: float, err: float) -> tuple[str, str]:
    """`value` and `err` to the decimals that give `err` two significant digits."""
    if not (is_number(err) and math.isfinite(err) and err > 0):
        return f"{value:.4g}", ("" if not is_number(err) else f"{err:.2g}")
    d = max(0, min(10, 1 - math.floor(math.log10(err))))
    return f"{value:.{d}f}", f"{err:.{d}f}"


def settings(rows: list[dict], baseline: str | None, metric: str | None) -> tuple[str | None, str]:
    """(baseline, metric): the arguments, else the jobs' own `sweep.baseline`/`sweep.metric`."""
    saved = next((r["sweep"] for r in rows if r["sweep"]), {})
    return (baseline if baseline is not None else saved.get("baseline"),
            metric or saved.get("metric") or DEFAULT_METRIC)


def statistics(configs: list[Configuration], base: Configuration) -> list[dict]:
    """One dict per (configuration, metric) with `STAT_KEYS`; the difference is
    configuration minus baseline (NaN interval where either has n < 2)."""
    metrics = sorted({m for c in configs for j in c.complete for m in j["metrics"]})
    out = []
    for c in configs:
        for m in metrics:
            values = c.values(m)
            if not values:
                continue
            mean, sd = mean_sd(values)
            base_values = base.values(m)
            d = welch(values, base_values) if base_values and c is not base else None
            out.append({"config": c.label, "n": len(values), "jobs": " ".join(j["job"] for j in c.jobs),
                        "metric": m, "mean": mean, "sd": sd, "baseline": base.label,
                        "diff": d.diff if d else math.nan, "ci95_low": d.low if d else math.nan,
                        "ci95_high": d.high if d else math.nan, "ci95_half": d.half if d else math.nan,
                        "df": d.df if d else math.nan, "excludes_zero": bool(d and d.excludes_zero),
                        "_difference": d})
    return out


def _write_csv(path: str, keys, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        w.writerows([{k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])


def _buys_table(metric: str, stats: list[dict], base: Configuration) -> list[str]:
    rows = [s for s in stats if s["metric"] == metric]
    if not rows:
        return []
    lines = [f"### {metric}", "", "| configuration | n | mean ± sd | vs baseline | 95% interval | excludes 0 |",
             "|---|---|---|---|---|---|"]
    for s in rows:
        m, sd = _pm(s["mean"], s["sd"])
        spread = f"{m} ± {sd}" if sd else f"{m} (n=1: no sd)"
        d = s["_difference"]
        if s["config"] == base.label:
            buys, interval, mark = "baseline", "", ""
        elif d is None:
            buys, interval, mark = "baseline has no value", "", ""
        elif not d.defined:
            buys = f"{s['config']} buys {d.diff:+.4g}"
            interval, mark = "undefined (n=1: run more seeds)", "n/a"
        else:
            diff, half = _pm(d.diff, d.half)
            buys = f"{s['config']} buys {'+' if d.diff >= 0 else ''}{diff} ± {half}"
            df = "inf" if math.isinf(d.df) else f"{d.df:.3g}"
            lo, hi = _pm(d.low, d.half)[0], _pm(d.high, d.half)[0]
            interval, mark = f"[{lo}, {hi}] (Welch df {df})", "**yes**" if d.excludes_zero else "no"
        lines.append(f"| {s['config']} | {s['n']} | {spread} | {buys} | {interval} | {mark} |".replace("`", ""))
    return [*lines, ""]


def _markdown(rows: list[dict], configs: list[Configuration], stats: list[dict], base: Configuration,
              metric: str, notes: list[str]) -> str:
    lines = ["| " + " | ".join(JOB_KEYS[:-2]) + " |", "|" + "---|" * len(JOB_KEYS[:-2])]
    lines += ["| " + " | ".join(_fmt(r[k]).replace("|", "\\|") for k in JOB_KEYS[:-2]) + " |" for r in rows]
    failed = sum(r["status"] == "failed" for r in rows)
    text = "# Sweep results (best eval/loss first)\n\n" + "\n".join(lines) + "\n"
    if failed:
        text += f"\n{failed} of {len(rows)} job(s) failed; their reason is in the error column.\n"
    unfinished = [r["job"] for r in rows if r["status"] == "unfinished"]
    if unfinished:
        text += (f"\nJob(s) {', '.join(unfinished)} did not finish; run the same sweep command (same "
                 f"hydra.sweep.dir) again to resume them from their last checkpoint.\n")
    seeds = ", ".join(f"{c.label}: n={len(c.complete)}" for c in configs)
    text += (f"\n## What each configuration buys\n\nConfigurations are the jobs that differ only by `seed` "
             f"({seeds}). Each row: mean ± standard deviation over seeds, and the difference from the "
             f"baseline `{base.label}` (configuration minus baseline) with its {CONFIDENCE:.0%} interval "
             f"(Welch's t, Welch–Satterthwaite degrees of freedom); **yes** marks an interval that "
             f"excludes zero. Every metric is in sweep_stats.csv.\n\n")
    headline = [metric, *(m for m in HEADLINE if m != metric)]
    for m in headline:
        table = _buys_table(m, stats, base)
        text += "\n".join(table) + ("\n" if table else "")
    for note in notes:
        text += f"\nNote: {note}\n"
    return text


def write_report(sweep_dir: str, baseline: str | None = None, metric: str | None = None) -> list[dict]:
    """Write the report files of `sweep_dir` (see the module docstring) from its job dirs alone;
    returns the job rows, best eval/loss first ([] and nothing written when it has no job).

    `baseline` (overrides naming one configuration) and `metric` default to the jobs' own
    `sweep.baseline` and `sweep.metric`. Raises ValueError when an explicit `baseline` names no
    single configuration; a saved one that does not is noted and the first configuration used.
    """
    rows = collect(sweep_dir)
    if not rows:
        return rows
    configs = configurations(rows)
    chosen, metric = settings(rows, baseline, metric)
    notes = []
    try:
        base = find_baseline(configs, chosen)
    except ValueError as e:
        if baseline is not None:
            raise
        notes.append(f"{e} The first configuration is the baseline.")
        base = configs[0]
    stats = statistics(configs, base)
    curves = [config_curve(c) for c in configs]
    rows.sort(key=lambda r: (not is_number(r["eval/loss"]), r["eval/loss"] if is_number(r["eval/loss"]) else 0.0,
                             int(r["job"]) if str(r["job"]).isdigit() else 0))
    _write_csv(os.path.join(sweep_dir, "sweep.csv"), JOB_KEYS, rows)
    _write_csv(os.path.join(sweep_dir, "sweep_stats.csv"), STAT_KEYS, stats)
    _write_csv(os.path.join(sweep_dir, "sweep_curves.csv"), CURVE_KEYS,
               [{"config": cv.label, "n": cv.n, "step": s, "tokens": t, "eval/loss mean": m, "eval/loss sd": sd}
                for cv in curves if cv is not None for s, t, m, sd in zip(cv.steps, cv.tokens, cv.mean, cv.sd)])
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write(_markdown(rows, configs, stats, base, metric, notes))
    write_plot(configs, curves, os.path.join(sweep_dir, "sweep.png"))
    return rows
