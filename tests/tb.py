"""Read TensorBoard event files back with TensorBoard's own reader."""
from __future__ import annotations

import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _dir_accumulator(run_dir: str) -> EventAccumulator:
    """One reader over every event file of `run_dir`, as TensorBoard itself reads a run (files in
    order, purging events a resumed writer superseded)."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalar_events(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] exactly as TensorBoard shows the run (duplicates kept)."""
    acc = _dir_accumulator(run_dir)
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value}; asserts that TensorBoard shows each step of each tag once."""
    out: dict[str, dict[int, float]] = {}
    for tag, events in read_scalar_events(run_dir).items():
        steps = [s for s, _ in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears more than once: {steps}"
        out[tag] = dict(events)
    return out


def read_accumulator(run_dir: str) -> EventAccumulator:
    path = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))[0]
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc
