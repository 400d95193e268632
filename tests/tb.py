"""Read TensorBoard event files back with TensorBoard's own reader."""
from __future__ import annotations

import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file in `run_dir` (a resumed run adds a file)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                out.setdefault(tag, {})[ev.step] = ev.value
    return out


def read_accumulator(run_dir: str) -> EventAccumulator:
    path = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))[0]
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc
