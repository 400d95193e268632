"""Logging: TensorBoard (rank 0 only), progress on stderr, per-run peak memory, and summary.json."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import torch



class Logger:
    """Scalars to TensorBoard and progress on stderr, on rank 0; a no-op elsewhere.

    Progress is a tqdm bar when stderr is a terminal, else one plain line per logged step (a log
    file or a cluster job gets no carriage-return frames). `start_step` > 0 (a resume) opens the
    event file with `purge_step=start_step + 1`: TensorBoard's reader then drops the events a
    previous invocation wrote past the checkpoint it resumed from, so every step appears once.
    """

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled, self.writer, self.bar = enabled, None, None
        self.total_steps, self.plain = total_steps, False
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=run_dir, purge_step=start_step + 1 if start_step > 0 else None)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        else:
            self.plain = progress

    def config(self, text_yaml: str, hparams: dict[str, Any], step: int = 0) -> None:
        """The resolved config as text at `step` (a resume adds its own config at its start step,
        beside the original's at 0), and hparams for TensorBoard's HParams tab (once per run)."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hp

        self.writer.add_text("config", "```\n" + text_yaml + "\n```", step)
        if step > 0:
            return
        # Written into this run's own event file (add_hparams would make a sub-run per call).
        exp, ssi, sei = hp(hparams, {"eval/loss": 0.0, "eval/accuracy": 0.0})
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def advance(self, n: int) -> None:
        """`n` more steps done (moves the bar)."""
        if self.bar:
            self.bar.update(n)

    def progress(self, step: int, values: dict[str, str]) -> None:
        """The latest logged values: the bar's postfix, or one plain line when not on a terminal."""
        if self.bar:
            self.bar.set_postfix(values, refresh=False)
        elif self.plain:
            print(f"step {step}/{self.total_steps}  " + "  ".join(f"{k} {v}" for k, v in values.items()),
                  file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window for this run (a multirun's jobs share one process).

    CUDA: the allocator's peak statistics. CPU (Linux): writing 5 to /proc/self/clear_refs resets
    the process's peak resident set (VmHWM) to its current size; where that is not possible the
    peak stays the process's lifetime peak, and `peak_memory_mb` says which it reports.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory (MiB) since `reset_peak_memory`: CUDA allocator peak, or peak RSS on CPU
    (VmHWM from /proc/self/status; `ru_maxrss`, the lifetime peak, where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_summary(path: str, summary: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
