"""Save and resume everything a step depends on: weights, optimizer, schedule, scaler, every RNG
on every rank, and the step (which fixes the data position, see `data.BatchStream`).

Files are `checkpoints/step_XXXXXXXX.pt`, written to a temporary name and renamed when complete;
only complete files are ever listed or loaded.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from trainer.errors import ConfigError
from trainer.distributed import Dist, unwrap

_NAME = re.compile(r"^step_(\d{8})\.pt$")
FORMAT = 1


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoint files in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if _NAME.match(n))
    return [os.path.join(directory, n) for n in names]


def rng_state(gen: torch.Generator) -> dict:
    """This process's generators: torch (CPU, CUDA), numpy, python, and the objective's.

    Only tensors and plain Python values, so the checkpoint loads with `weights_only=True`.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "objective": gen.get_state()}


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["objective"])


def _model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    if sharded:  # FSDP: every rank takes part in gathering full tensors; rank 0 writes them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def save_checkpoint(directory: str, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, gen: torch.Generator, train_state: dict,
                    meta: dict, keep: int, d: Dist, sharded: bool) -> str | None:
    """Write `step_<step>.pt` atomically (rank 0), then prune to the newest `keep` files."""
    model_sd, optim_sd = _model_optim_state(model, optimizer, sharded)
    rngs = [rng_state(gen)]
    if d.world_size > 1:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state(gen))
    path = os.path.join(directory, f"step_{step:08d}.pt")
    if d.is_main:
        os.makedirs(directory, exist_ok=True)
        payload = {"format": FORMAT, "step": step, "model": model_sd, "optimizer": optim_sd,
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                   "train_state": train_state, "meta": meta}
        tmp = path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old set or the complete new file
        for old in list_checkpoints(directory)[:-keep]:
            os.remove(old)
    if d.world_size > 1:
        dist.barrier()
    return path


def find_resume(resume: str, directory: str) -> str | None:
    """The checkpoint to resume from under `trainer.resume`, or None to start fresh."""
    if resume == "never":
        if list_checkpoints(directory):
            raise ConfigError(f"trainer.resume=never but {directory} already holds checkpoints; "
                              f"use a new run dir (hydra.run.dir=...) or trainer.resume=auto.")
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = os.path.expanduser(resume)
    if os.path.isdir(path):
        found = list_checkpoints(path) or list_checkpoints(os.path.join(path, "checkpoints"))
        if not found:
            raise ConfigError(f"trainer.resume={resume!r} is a directory with no step_*.pt checkpoint in it.")
        return found[-1]
    if not os.path.isfile(path):
        raise ConfigError(f"trainer.resume={resume!r}: no such checkpoint file (use auto, never, or a path).")
    return path


def safe_load(path: str, what: str = "file", hint: str = "") -> Any:
    """`torch.load` that never executes code: `weights_only=True` (tensors, numbers, strings,
    lists, tuples and dicts only; no pickled classes or callables).

    Raises ConfigError naming the file (which is left untouched) when it is unreadable, corrupt,
    or holds anything else, e.g. a crafted pickle that would run code when loaded.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = ("it holds objects other than tensors and plain values, and loading it could run code; "
                  "it was refused" if "weights_only" in str(e) or "Weights only" in str(e)
                  else f"it is corrupt ({type(e).__name__})")
    except Exception as e:  # truncated zip, not a torch file, permissions ...
        reason = f"it is corrupt or unreadable ({type(e).__name__})"
    raise ConfigError(f"{what} {path} could not be loaded: {reason}; it was left as is"
                      + (f": {hint}." if hint else "."))


def read_checkpoint(path: str, meta: dict) -> dict:
    """Load and check a checkpoint; a corrupt or incompatible file raises a one-sentence ConfigError."""
    payload = safe_load(path, what="checkpoint", hint="move it aside or set trainer.resume=<another checkpoint>")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this trainer (format "
                          f"{payload.get('format') if isinstance(payload, dict) else '?'}); it was left as is.")
    check_structure(payload, path, meta["structure"])
    return payload


def check_structure(payload: dict, path: str, structure: dict, defaults: dict | None = None) -> None:
    """Refuse (one-sentence ConfigError) a checkpoint saved with other `structure` values, e.g.
    another tokenizer (`tokenizer=<kind>:<hash of its tokenizer.json>`). A key the checkpoint does
    not record is taken from `defaults` (checkpoints from before it was recorded), else not checked.
    """
    saved = {**(defaults or {}), **payload.get("meta", {}).get("structure", {})}
    for key, value in structure.items():
        if key in saved and saved[key] != value:
            hint = ("; resume with the tokenizer it was trained with, or start a new run dir"
                    if key == "tokenizer" else "")
            raise ConfigError(f"checkpoint {path} is incompatible with this run: it was saved with "
                              f"{key}={saved[key]} but this run has {key}={value}; it was left as is{hint}.")


def restore(payload: dict, path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, gen: torch.Generator, d: Dist, sharded: bool) -> dict:
    """Load a checked payload into the live objects; returns the saved train_state."""
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=payload["model"],
                           optim_state_dict=payload["optimizer"],
                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            unwrap(model).load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:160]}); "
                          f"it was left as is.") from e
    scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"] and scaler.is_enabled():  # fp32/bf16 checkpoints carry no scaler state
        scaler.load_state_dict(payload["scaler"])
    rngs = payload["rng"]
    if len(rngs) != d.world_size:
        raise ConfigError(f"checkpoint {path} was saved by {len(rngs)} process(es) but this run has "
                          f"{d.world_size}; resume with the same world size.")
    set_rng_state(rngs[d.rank], gen)
    return payload["train_state"]


def structure(cfg) -> dict:
    """What a checkpoint's tensors depend on (checked on resume, for a one-sentence mismatch error)."""
    out = {f"model.{k}": v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
           if k not in ("dropout", "attn_dropout")}
    out.update({"position": cfg.position.kind, "norm": cfg.norm.kind, "norm.placement": cfg.norm.placement,
                "quantize": cfg.quantize.method if cfg.quantize.method == "qat_int8" else "none"})
    if cfg.position.kind == "learned":
        out["data.seq_len"] = cfg.data.seq_len
    return out
