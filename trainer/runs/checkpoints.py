"""Save and resume everything a step depends on: weights, optimizer, schedule, scaler, every RNG
on every rank, and the step (which fixes the data position, see `data.BatchStream`).

Two layouts, both written under a temporary name and renamed when complete (only complete ones are
ever listed or loaded):

- `checkpoints/step_XXXXXXXX.pt`: one file written by rank 0 (single process, DDP).
- `checkpoints/step_XXXXXXXX.dcp/`: a `torch.distributed.checkpoint` (DCP) directory (FSDP): every
  rank writes its own shard of the model and optimizer tensors (`__<rank>_0.distcp`), never gathered;
  rank 0 adds `.metadata` and `extra.pt` (step, schedule, scaler, every rank's RNG, the optimizer's
  hyper-parameters, train_state, meta; tensors and plain values only).

Either layout resumes on any world size and parallel kind: DCP reshards on load, and a world size
other than the saved one derives each rank's RNG from (seed, step, rank) (`restore`).
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from trainer.errors import ConfigError
from trainer.distributed import Dist, unwrap
from trainer.runs.checkpoint_files import EXTRA, is_complete, is_sharded, list_checkpoints, rotate  # noqa: F401
from trainer.runs.dcp import dcp_metadata, full_model_state, safe_reader, save_sharded, wait_for_checkpoints  # noqa: F401
from trainer.runs.tp_layout import canonical_buffers, from_canonical, full_to_tp_order, tp_rows

FORMAT = 1


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
    """Restore the generators `rng_state` saved (this rank's)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["objective"])


def derive_rng_state(seed: int, step: int, rank: int, objective: torch.Tensor, gen: torch.Generator) -> None:
    """Seed this rank's generators from (seed, step, rank): a resume on another world size, where
    no saved per-rank stream fits. The objective's generator (the same stream on every rank, it
    draws the global batch's masks) continues from the saved `objective` state."""
    s = ((seed * 1_000_003 + step) * 65_537 + rank) % (2 ** 63)
    torch.manual_seed(s)  # CPU and every CUDA device
    np.random.seed(s % (2 ** 32))
    random.seed(s)
    gen.set_state(objective)


def _gather_rngs(gen: torch.Generator, d: Dist) -> list:
    rngs = [rng_state(gen)]
    if d.world_size > 1:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state(gen))
    return rngs


def save_checkpoint(directory: str, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, gen: torch.Generator, train_state: dict,
                    meta: dict, keep: int, d: Dist, sharded: bool, async_save: bool = False) -> str | None:
    """Write one checkpoint atomically, then prune to `keep`: this one and the newest `keep - 1`
    others (a run dir holds one line of training: `trainer.runs.resume`). Every rank calls it.

    sharded (FSDP): `step_<step>.dcp/`, each rank writing its own shard; with `async_save` the
    tensors are staged to CPU memory and written in a background thread while training goes on
    (renamed complete by the next save or `wait_for_checkpoints`). Otherwise `step_<step>.pt` from
    rank 0. Returns the checkpoint's final path.
    """
    wait_for_checkpoints()
    rngs = _gather_rngs(gen, d)
    extra = {"format": FORMAT, "step": step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": rngs, "train_state": train_state, "meta": meta}
    if sharded:
        return save_sharded(directory, step, model, optimizer, extra, keep, d, async_save)
    path = os.path.join(directory, f"step_{step:08d}.pt")
    if d.is_main:
        os.makedirs(directory, exist_ok=True)
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        payload = {**extra, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                   # the optimizer's numbered parameters by name, so a layout holding part of the
                   # model (a pipeline stage) can pick its own
                   "optim_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]}
        tmp = path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old set or the complete new file
        rotate(directory, path, keep)
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
    path = os.path.expanduser(resume).rstrip(os.sep) or os.sep
    if is_sharded(path):
        if not is_complete(path):
            raise ConfigError(f"trainer.resume={resume!r} is an incomplete sharded checkpoint (no .metadata or "
                              f"{EXTRA} in it); resume from a complete step_<N>.dcp.")
        return path
    if os.path.isdir(path):
        found = list_checkpoints(path) or list_checkpoints(os.path.join(path, "checkpoints"))
        if not found:
            raise ConfigError(f"trainer.resume={resume!r} is a directory with no step_*.pt or step_*.dcp "
                              f"checkpoint in it.")
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
    """Load and check a checkpoint; a corrupt or incompatible one raises a one-sentence ConfigError.

    A sharded (`.dcp`) checkpoint returns its `extra.pt` with `"dcp": path`; its tensors are read
    by `restore`, into whatever layout the live model has.
    """
    hint = "move it aside or set trainer.resume=<another checkpoint>"
    sharded = is_sharded(path)
    payload = safe_load(os.path.join(path, EXTRA) if sharded else path, what="checkpoint", hint=hint)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not (sharded or "model" in payload):
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this trainer (format "
                          f"{payload.get('format') if isinstance(payload, dict) else '?'}); it was left as is.")
    if sharded:
        payload["dcp"] = path
    check_structure(payload, path, meta["structure"])
    return payload
def checkpoint_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the full model state_dict on the CPU, the run's resolved config) of the checkpoint at `path`.

    Raises:
        ConfigError: not a checkpoint of this trainer, corrupt, or unsafe to load (one sentence).
    """
    payload = read_checkpoint(path, {"structure": {}})
    if is_sharded(path):
        weights = full_model_state(path)
    else:
        weights = {k: v.detach().cpu() for k, v in payload["model"].items()}
    config = payload.get("meta", {}).get("config")
    if not config:
        raise ConfigError(f"checkpoint {path} records no config, so its weights cannot be described; "
                          f"it was left as is.")
    return weights, config


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




def _fqn_optim(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
               saved_names: list[list[str]] | None = None) -> dict:
    """An `optimizer.state_dict()` (parameters numbered) keyed by parameter names instead, the
    form `set_state_dict` takes; one already keyed by names is returned as is. `saved_names`: the
    names the checkpoint recorded for its numbered parameters (else the live optimizer's, in order)."""
    if all(isinstance(p, str) for g in saved["param_groups"] for p in g["params"]):
        return saved
    if saved_names is not None:
        live = [n for g in saved_names for n in g]
    else:
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        live = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    ids = dict(zip((p for g in saved["param_groups"] for p in g["params"]), live))
    return {"state": {ids[k]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [ids[p] for p in g["params"]]} for g in saved["param_groups"]]}


def _own(full: dict, names: set[str]) -> dict:
    """The entries of a full state (model tensors or `{"state", "param_groups"}`) this rank's model
    holds (a pipeline stage holds a slice of the model)."""
    if "state" in full:
        return {"state": {k: v for k, v in full["state"].items() if k in names},
                "param_groups": [{**g, "params": [p for p in g["params"] if p in names]} for g in full["param_groups"]]}
    return {k: v for k, v in full.items() if k in names}


_IMPL = ("fused", "foreach", "capturable", "differentiable")  # how this process runs the update, not what it is


def _groups(saved: list[dict], live: list[dict]) -> list[dict]:
    """The saved groups' hyper-parameters on the live groups' parameter names, keeping the live
    optimizer's implementation flags (a tensor-parallel optimizer runs per parameter, another
    layout's may be fused)."""
    return [{**s, "params": now["params"], **{k: now[k] for k in _IMPL if k in now}} for s, now in zip(saved, live)]


def _load_tensors(payload: dict, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """Weights and optimizer state from either layout into the live model's layout (resharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model = unwrap(model) if getattr(model, "wraps_module", False) else model  # a pipeline stage's own slice
    if "dcp" in payload:  # every rank reads the pieces of the saved shards it now owns
        import torch.distributed.checkpoint as dcp  # heavy; only sharded checkpoints need it

        model_sd, optim_sd = get_state_dict(model, optimizer)  # this layout's tensors, filled in place
        live = canonical_buffers(model, model_sd, optim_sd["state"])  # tensor parallel: the saved row order
        tensors = {"model": model_sd, "optim": optim_sd["state"]}
        with warnings.catch_warnings():  # DCP warns when it loads in one process: a supported resume here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=safe_reader(payload["dcp"]),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
        from_canonical(model, model_sd, optim_sd["state"], live)
        # The saved hyper-parameters on this layout's parameter names (a pipeline stage saves its own).
        groups = _groups(payload["optim_groups"], optim_sd["param_groups"])
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict={"state": optim_sd["state"], "param_groups": groups})
    elif sharded:  # a full single-file checkpoint into a sharded layout: each rank keeps its part
        names = set(model.state_dict())
        optim = _own(_fqn_optim(payload["optimizer"], model, optimizer, payload.get("optim_names")), names)
        optim["param_groups"] = [{**g, **{k: now[k] for k in _IMPL if k in now}}
                                 for g, now in zip(optim["param_groups"], optimizer.param_groups)]
        full = full_to_tp_order(model, _own(payload["model"], names))
        optim["state"] = {k: {n: tp_rows(model, k, t) for n, t in v.items()} for k, v in optim["state"].items()}
        set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=optim,
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])


def restore(payload: dict, path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, gen: torch.Generator, d: Dist, sharded: bool) -> dict:
    """Load a checked payload into the live objects; returns the saved train_state.

    Any layout into any layout: a `.dcp` or `.pt` checkpoint, saved by any number of processes,
    resumes under single, DDP or FSDP on any world size. With the saved world size each rank gets
    its own saved RNG streams back; with another, each rank's are seeded from (seed, step, rank)
    (`derive_rng_state`) and the objective's shared stream continues. Raises ConfigError when the
    tensors do not fit this model.
    """
    try:
        _load_tensors(payload, model, optimizer, sharded)
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:160]}); "
                          f"it was left as is.") from e
    scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"] and scaler.is_enabled():  # fp32/bf16 checkpoints carry no scaler state
        scaler.load_state_dict(payload["scaler"])
    rngs = payload["rng"]
    if len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank], gen)
    else:
        seed = payload.get("meta", {}).get("config", {}).get("seed", 0)
        derive_rng_state(seed, payload["step"], d.dp_rank, rngs[0]["objective"], gen)
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
