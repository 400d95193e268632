"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP): every rank writes its own
shards (async optionally), rank 0 renames the directory when complete; reading goes through an
allow-list so nothing loaded runs code."""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.distributed import Dist, unwrap
from trainer.errors import ConfigError
from trainer.runs.checkpoint_files import EXTRA, rotate
from trainer.runs.tp_layout import to_canonical

_PENDING: list[dict] = []  # an async DCP save still writing (at most one)
_ASYNC_GROUP: list = []  # (default group, the gloo group async saves coordinate on)


def _async_group(d: Dist):
    """A gloo group of its own for async saves, so their collectives never interleave with the
    training step's on the default group."""
    if d.world_size == 1:
        return None
    if not _ASYNC_GROUP or _ASYNC_GROUP[0] is not dist.group.WORLD:
        _ASYNC_GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo")]
    return _ASYNC_GROUP[1]


def save_sharded(directory: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                  keep: int, d: Dist, async_save: bool) -> str:
    import torch.distributed.checkpoint as dcp  # heavy; only sharded runs need it
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = unwrap(model)  # a pipeline stage: its own slice of the model, under the model's names
    model_sd, optim_sd = get_state_dict(model, optimizer)  # each rank's own shards: nothing is gathered
    to_canonical(model, model_sd, optim_sd["state"])  # tensor parallel: packed rows in the model's order
    tensors = {"model": model_sd, "optim": {k: v for k, v in optim_sd["state"].items()}}
    extra["optim_groups"] = optim_sd["param_groups"]  # hyper-parameters: plain values, kept out of DCP's pickles
    path = os.path.join(directory, f"step_{step:08d}.dcp")
    tmp = path + ".tmp"
    if d.is_main:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(tmp):  # a save that died half-way
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    if d.world_size > 1:
        dist.barrier()
    pending = {"directory": directory, "path": path, "tmp": tmp, "keep": keep, "d": d}
    if async_save:
        pending["future"] = dcp.async_save(tensors, checkpoint_id=tmp, process_group=_async_group(d))
    else:
        dcp.save(tensors, checkpoint_id=tmp)
    if d.is_main:
        torch.save(extra, os.path.join(tmp, EXTRA))
    _PENDING.append(pending)
    if not async_save:
        wait_for_checkpoints()
    return path


def wait_for_checkpoints() -> None:
    """Finish a pending sharded save: wait for its writes, then (after a barrier, so every rank's
    shard is on disk) rank 0 renames `step_<N>.dcp.tmp` to `step_<N>.dcp` and prunes. Every rank
    calls it; a no-op when nothing is pending."""
    while _PENDING:
        p = _PENDING.pop(0)
        if "future" in p:
            fut = p["future"]
            getattr(fut, "upload_completion", fut).result()
        d = p["d"]
        if d.world_size > 1:
            dist.barrier()
        if d.is_main:
            if os.path.isdir(p["path"]):  # the same step saved again (a rerun that trained no step)
                shutil.rmtree(p["path"])
            os.replace(p["tmp"], p["path"])  # atomic on one filesystem: listed only once complete
            rotate(p["directory"], p["path"], p["keep"])
        if d.world_size > 1:
            dist.barrier()  # no rank lists checkpoints before the rename


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle; this reads it with an allow-list (DCP's metadata classes,
    torch.Size, dtypes, layouts, paths), so a crafted file cannot run code when a run resumes."""

    _DCP = {"torch.distributed.checkpoint.metadata": {"Metadata", "ChunkStorageMetadata", "MetadataIndex",
                                                      "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                                      "_MEM_FORMAT_ENCODING"},
            "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
            "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath"},
            "collections": {"OrderedDict"}}

    def find_class(self, module: str, name: str) -> Any:
        if name in self._DCP.get(module, ()) or (module == "torch" and (
                name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def safe_reader(path: str):
    """A DCP `FileSystemReader` for `path` whose metadata is read with `_MetadataUnpickler` and
    that refuses pickled (non-tensor) items, which DCP would load with `weights_only=False`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            try:
                with open(os.path.join(self.path, ".metadata"), "rb") as f:
                    md = _MetadataUnpickler(f).load()
            except Exception as e:
                raise ConfigError(f"checkpoint {path} could not be loaded: its .metadata is corrupt or holds "
                                  f"objects that could run code ({str(e)[:120]}); it was left as is.") from e
            if any(isinstance(m, BytesStorageMetadata) for m in md.state_dict_metadata.values()):
                raise ConfigError(f"checkpoint {path} holds pickled objects, which could run code when loaded; "
                                  f"it was refused and left as is.")
            md.storage_meta = getattr(md, "storage_meta", None)
            if md.storage_meta is not None:
                md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def dcp_metadata(path: str):
    """The DCP `Metadata` of a sharded checkpoint (every tensor's global size and its chunks, and
    which rank's file holds each chunk in `storage_data`), read through the allow-list."""
    return safe_reader(path).read_metadata()


def full_model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole model of a sharded (`.dcp`) checkpoint, read into one CPU state_dict in this
    process (every rank's shards stitched together; no process group needed). Raises ConfigError
    for a corrupt or unsafe checkpoint."""
    import torch.distributed.checkpoint as dcp  # heavy; only sharded checkpoints need it

    md = dcp_metadata(path)
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if k.startswith("model.")}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, storage_reader=safe_reader(path), no_dist=True)
    return {k.removeprefix("model."): v for k, v in sd.items()}
