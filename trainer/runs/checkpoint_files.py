"""Checkpoint files on disk: their names, which are complete, and rotation.

`step_<N>.pt` (one file, rank 0) or `step_<N>.dcp/` (a DCP directory, every rank's shard plus
rank 0's `.metadata` and `extra.pt`); `*.tmp` names are never listed.
"""
from __future__ import annotations

import os
import re
import shutil

_NAME = re.compile(r"^step_(\d{8})\.(pt|dcp)$")
EXTRA = "extra.pt"  # rank 0's part of a DCP checkpoint: everything but the sharded tensors


def is_sharded(path: str) -> bool:
    """Whether `path` is a DCP checkpoint directory (`step_<N>.dcp`)."""
    return path.rstrip(os.sep).endswith(".dcp") and os.path.isdir(path)


def is_complete(path: str) -> bool:
    if path.endswith(".pt"):
        return os.path.isfile(path)
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, EXTRA))


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in `directory` (`step_<N>.pt` files and `step_<N>.dcp` directories),
    oldest step first; temporary (`*.tmp`) and incomplete ones are never listed."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m[1]), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return [p for _, n in sorted(found) if is_complete(p := os.path.join(directory, n))]


def rotate(directory: str, path: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints; never remove the one just written (`path`)."""
    older = [p for p in list_checkpoints(directory) if p != path]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
