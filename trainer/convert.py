"""`python -m trainer.convert run_dir=<run> output=<dir>`: any checkpoint of a run as full weights.

A sharded checkpoint (`step_<N>.dcp`, written by every rank of an FSDP run) is read whole in this
one process, with no process group (`trainer.runs.dcp.full_model_state`: DCP's own loader,
the same job as `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`, but reading DCP's
metadata through an allow-list, so a crafted checkpoint cannot run code); a single-file `step_<N>.pt`
is read with `weights_only=True`. The output folder gets `model.safetensors` (with the run's
config in its header), `model.pt`, `.hydra/config.yaml` and the run's `tokenizer.json` when it has
one: a folder every other tool (`generate`, `evaluate`, `embed`, `model.init_from`) reads like a run.
Every key, its default and its help: `conf/tools/convert.yaml`, or `python -m trainer.convert --help`.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch
from omegaconf import OmegaConf

from trainer.errors import ConfigError
from trainer.runs.checkpoints import checkpoint_weights
from trainer.runs import checkpoints as ckpt
from trainer.cli import compose_tool
from trainer.runs.artifacts import save_weights
from trainer.cli import run_tool

TOOL = "convert"  # conf/tools/convert.yaml: every key, its default and its help line

def _checkpoint(run_dir: str, given: str | None) -> str:

    if given:
        path = os.path.abspath(os.path.expanduser(given))
        if not (os.path.isfile(path) or ckpt.is_sharded(path)):
            raise ConfigError(f"checkpoint={given} is not a step_<N>.pt file or step_<N>.dcp directory.")
        return path
    found = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        raise ConfigError(f"run_dir={run_dir} holds no complete checkpoint (checkpoints/step_<N>.pt or "
                          f"step_<N>.dcp); pass a training run dir or checkpoint=<path>.")
    return found[-1]

def run_convert(argv: list[str]) -> str:
    """Compose `conf/tools/convert.yaml` with `argv`, read the checkpoint and write the full
    weights into `output`; returns the output folder.

    Raises:
        ConfigError: bad input (a key, a run dir without checkpoints, an output that already holds
            weights), before anything is written.
    """

    a, _ = compose_tool(TOOL, argv)
    if not a.run_dir or not a.output:
        raise ConfigError("run_dir=... and output=... are both required: the training run and the folder to write.")
    run_dir = os.path.abspath(os.path.expanduser(a.run_dir))
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={a.run_dir} is not a directory; pass a training run dir.")
    out = os.path.abspath(os.path.expanduser(a.output))
    taken = [n for n in ("model.safetensors", "model.pt") if os.path.exists(os.path.join(out, n))]
    if taken:
        raise ConfigError(f"output={a.output} already holds {taken[0]}; choose an empty or new folder "
                          f"(nothing was written).")
    path = _checkpoint(run_dir, a.checkpoint)
    weights, config = checkpoint_weights(path)
    os.makedirs(os.path.join(out, ".hydra"), exist_ok=True)
    save_weights(weights, os.path.join(out, "model.safetensors"), config)
    torch.save(weights, os.path.join(out, "model.pt.tmp"))
    os.replace(os.path.join(out, "model.pt.tmp"), os.path.join(out, "model.pt"))
    OmegaConf.save(OmegaConf.create(config), os.path.join(out, ".hydra", "config.yaml"))
    if os.path.isfile(os.path.join(run_dir, "tokenizer.json")):
        shutil.copyfile(os.path.join(run_dir, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    print(f"{path} -> {out} ({len(weights)} tensors, {sum(v.numel() for v in weights.values()):,} parameters)")
    return out

def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence;
    `--help` prints every key)."""

    return run_tool(TOOL, run_convert, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
