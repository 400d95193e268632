"""Per-run process state: seeds, thread count and stop-signal handlers, set and undone per run
(a Hydra multirun runs its jobs one after another in one process)."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
from typing import Iterator

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (the CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def process_scope(threads: int | None) -> Iterator[list[int]]:
    """Set the torch thread count and SIGTERM/SIGINT handlers that ask the loop to stop after its
    step; yields the list the handlers append signal numbers to. Both are undone on exit."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        torch.set_num_threads(old_threads)
