"""Each configuration's eval-loss curve: every job's TensorBoard scalars, read with TensorBoard's
own reader, put on a tokens axis and averaged over seeds."""
from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.sweeps.collect import Configuration
from trainer.sweeps.stats import mean_sd

TAG = "eval/loss"


def read_curve(job_dir: str, tag: str = TAG) -> dict[int, float]:
    """step -> value of `tag` in the job's event files, as TensorBoard shows the run (all its event
    files in order; a resumed writer's superseded steps purged). Empty when there is none."""
    if not glob.glob(os.path.join(job_dir, "events.out.tfevents.*")):
        return {}
    acc = EventAccumulator(job_dir, size_guidance={"scalars": 0})
    log = logging.getLogger("tensorboard")  # its reader logs every file it moves past at INFO
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        acc.Reload()
    finally:
        log.setLevel(level)
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {ev.step: float(ev.value) for ev in acc.Scalars(tag)}


@dataclass
class Curve:
    """A configuration's curve at the steps every one of its `n` jobs logged: `tokens` (training
    tokens seen at each step), the `mean` over jobs and the standard deviation `sd` (NaN for n=1)."""

    label: str
    n: int
    steps: list[int]
    tokens: list[float]
    mean: list[float]
    sd: list[float]


def config_curve(config: Configuration, tag: str = TAG) -> Curve | None:
    """The mean curve of `config`'s complete jobs (its unfinished or failed ones when none is
    complete); None when no job logged `tag`."""
    jobs = config.complete or config.jobs
    curves = [(j, c) for j in jobs if (c := read_curve(j["dir"], tag))]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for _, c in curves)))
    per_step = [float(j["tokens_per_step"]) for j, _ in curves if not math.isnan(j["tokens_per_step"])]
    tps = per_step[0] if per_step else 1.0  # same config, so the same tokens per step in every seed
    stats = [mean_sd([c[s] for _, c in curves]) for s in steps]
    return Curve(label=config.label, n=len(curves), steps=steps, tokens=[s * tps for s in steps],
                 mean=[m for m, _ in stats], sd=[sd for _, sd in stats])
