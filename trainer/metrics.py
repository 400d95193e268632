"""Logging: TensorBoard (rank 0 only), the tqdm bar, FLOPs/MFU, and summary.json."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import torch

from trainer.flops import peak_flops


class Logger:
    """Scalars to TensorBoard and a progress bar, on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled, self.writer, self.bar = enabled, None, None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=run_dir)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def config(self, text_yaml: str, hparams: dict[str, Any]) -> None:
        """The resolved config as text, and hparams for TensorBoard's HParams tab."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hp

        self.writer.add_text("config", "```\n" + text_yaml + "\n```", 0)
        # Written into this run's own event file (add_hparams would make a sub-run per call).
        exp, ssi, sei = hp(hparams, {"eval/loss": 0.0, "eval/accuracy": 0.0})
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def advance(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def mfu(tokens_per_sec: float, flops_per_token: float, device: torch.device, precision: str,
        world_size: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the measured peak of all ranks."""
    peak = peak_flops(device, precision) * world_size
    return tokens_per_sec * flops_per_token / peak if peak > 0 else 0.0


def write_summary(path: str, summary: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
