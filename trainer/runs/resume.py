"""What a resume may change, and which checkpoints one run dir may hold.

A resume continues one saved line of training exactly: the weights, optimizer, schedule, data
position and generators all come from the checkpoint. So every setting that defines that line
(sizes, data, tokenizer, objective, optimizer, schedule shape, batch, precision, seed) must equal
the checkpoint's; a command that changes one is refused in one sentence before any work, naming
each key with its saved and new value. Settings that only say how long to train, how often to
log, evaluate or save, where to run, or what to report afterwards are honoured and logged.

A checkpoint directory holds one line of training. Resuming another run's checkpoint into a run
dir that holds checkpoints would write new steps beside higher-numbered steps of another line,
and rotation or a later `resume=auto` would mix or drop them (transformers #37260): refused.
Resuming an older checkpoint of the same run dir starts a new line from it: the newer checkpoints
are moved into a `superseded_from_step_<N>/` folder, kept but never listed.
"""
from __future__ import annotations

import os

from trainer.errors import ConfigError

# Keys (dotted; a trailing "." is a whole group) a resume may change: they do not change the
# saved line of training, only how long it runs, what is logged or reported, and where.
HONOURED = ("trainer.max_steps", "trainer.steps_per_run", "trainer.eval_every", "trainer.eval_batches",
            "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
            "trainer.progress", "trainer.threads", "trainer.device", "trainer.compile",
            "data.cache_dir", "data.num_proc", "parallel.timeout_s", "quantize.",
            "attention.kind", "attention.block_size", "sweep.", "parallel.kind", "parallel.tp_size", "parallel.pp_schedule", "trainer.async_checkpoint",
            "trainer.activation_checkpointing", "trainer.ac_every")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _honoured(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HONOURED)


def config_changes(saved: dict, current: dict) -> tuple[list[tuple[str, object, object]], list[tuple[str, object, object]]]:
    """(refused, honoured) differences between a checkpoint's config and this command's.

    Args:
        saved: the resolved config the checkpoint was written with (a plain dict).
        current: this run's resolved config (a plain dict).
    Returns:
        Two lists of (dotted key, saved value, new value). A key the checkpoint does not record
        (added to the schema since) is not compared.
    """
    old, new = _flatten(saved), _flatten(current)
    refused, honoured = [], []
    for key in sorted(new):
        if key in old and old[key] != new[key]:
            (honoured if _honoured(key) else refused).append((key, old[key], new[key]))
    return refused, honoured


def check_resume_config(saved: dict, current: dict, path: str) -> list[tuple[str, object, object]]:
    """Refuse (ConfigError) a resume whose command changes what the checkpoint at `path` trained;
    returns the honoured changes (for the run to log)."""
    refused, honoured = config_changes(saved, current)
    if refused:
        listed = ", ".join(f"{k}={v!r} (the checkpoint has {s!r})" for k, s, v in refused)
        raise ConfigError(f"this command changes settings that checkpoint {path} was trained with: {listed}; a "
                          f"resume continues that run exactly, so drop these overrides, or start a new run dir "
                          f"(hydra.run.dir=<new dir>, with model.init_from={path} to start from its weights).")
    return honoured


def check_line(resume_path: str, ckpt_dir: str, existing: list[str]) -> list[str]:
    """The checkpoints of `ckpt_dir` that resuming from `resume_path` supersedes.

    Resuming from an older checkpoint of this run dir starts a new line from that step: the newer
    checkpoints (returned) belong to the abandoned line and are moved aside by the caller
    (`set_aside`), never mixed with the new steps. Resuming from a checkpoint of another directory
    into a run dir that already holds checkpoints is refused (ConfigError).

    Args:
        resume_path: the checkpoint file resumed from. ckpt_dir: this run's checkpoints directory.
        existing: the complete checkpoints in `ckpt_dir`, oldest first (`list_checkpoints`).
    """
    if not existing or os.path.abspath(resume_path) == os.path.abspath(existing[-1]):
        return []
    if os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(ckpt_dir):
        step = _step(resume_path)
        return [p for p in existing if _step(p) > step]
    newest = os.path.basename(existing[-1])
    raise ConfigError(f"trainer.resume={resume_path} would continue another run's line of training in {ckpt_dir}, "
                      f"which already holds {newest} of its own line; the two would be mixed (and rotation would "
                      f"delete the new steps): resume into a new run dir (hydra.run.dir=<new dir>), or use "
                      f"trainer.resume=auto to continue the newest checkpoint there.")


def _step(path: str) -> int:
    digits = "".join(ch for ch in os.path.basename(path) if ch.isdigit())
    return int(digits) if digits else -1


def set_aside(paths: list[str], ckpt_dir: str, step: int) -> str | None:
    """Move the superseded checkpoints `paths` into `<ckpt_dir>/superseded_from_step_<step>/`
    (a name no loader lists), so nothing is deleted and the directory holds one line. Returns the
    folder, or None when there was nothing to move."""
    if not paths:
        return None
    folder = os.path.join(ckpt_dir, f"superseded_from_step_{step:08d}")
    n = 1
    while os.path.exists(folder):
        n += 1
        folder = os.path.join(ckpt_dir, f"superseded_from_step_{step:08d}_{n}")
    os.makedirs(folder)
    for p in paths:
        os.replace(p, os.path.join(folder, os.path.basename(p)))
    return folder
