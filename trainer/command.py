"""The main command's own arguments: checks before Hydra starts a job, one-sentence errors with a
"did you mean", and the exact command that continues a run.

Hydra creates the run dir (and writes `.hydra/`) before the job function runs, so anything that
must be refused without writing is checked here first: the composed config against the schema,
the cross-field rules, `model.init_from`, and a resume into an existing run dir.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

from omegaconf import OmegaConf

from trainer import cli
from trainer.config.schema import CONF_DIR, Config
from trainer.errors import ConfigError
from trainer.config.validate import validate
from trainer.distributed import launched_by_torchrun
from trainer.pretrained import apply_pretrained_config
from trainer.runs.init_from import check_init_from
from trainer.run import check_resume
from trainer.runs import checkpoints as ckpt

HYDRA_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info")

def config_keys() -> list[str]:
    """Every dotted key of the schema (`trainer.max_steps`, ...) and every config group name."""
    def walk(node, prefix: str) -> list[str]:
        out = []
        for k in node:
            v = node[k] if not OmegaConf.is_missing(node, k) else None
            key = f"{prefix}{k}"
            out += walk(v, key + ".") if OmegaConf.is_dict(v) else [key]
        return out

    groups = sorted(d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d)))
    return walk(OmegaConf.structured(Config), "") + groups

def did_you_mean(word: str, options: list[str]) -> str:
    """`"; did you mean X?"` for the closest of `options` to `word` (`trainer.cli.did_you_mean`), else ""."""
    hint = cli.did_you_mean(word, options)  # " (did you mean X?)" or ""
    return "; " + hint.strip()[1:-1] if hint else ""

def group_options(group: str) -> list[str]:
    """The options of config group `group` (its YAML files), sorted."""
    folder = os.path.join(CONF_DIR, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []

def one_sentence(e: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one sentence naming the key and what is valid."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, ValidationError

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    found = re.search(r"full_key: (\S+)", str(e)) or re.search(r"full_key: (\S+)", str(root))
    key = getattr(root, "full_key", None) or (found.group(1) if found else None)
    text = str(root).splitlines()[0] if str(root) else type(root).__name__
    if isinstance(root, MissingConfigException) or "Could not find" in text:
        missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
        group, option = (missing.group(1), missing.group(2)) if missing else ("", "")
        options = list(getattr(root, "options", None) or group_options(group))
        valid = f"; choose one of: {', '.join(options)}" if options else ""
        hint = did_you_mean(option, options) if option else ""
        return f"{text.replace('In ' + chr(39) + 'config' + chr(39) + ': ', '')}{valid}{hint.rstrip('?')}" + (
            "?" if hint else ".")
    if (isinstance(root, ConfigKeyError) or " not in " in text) and key:
        return (f"{key} is not a config key ({text}){did_you_mean(key, config_keys())} "
                f"(`python -m trainer --cfg job` lists them all).")
    if isinstance(root, ValidationError) and key:
        return f"{key} has the wrong type: {text}."
    return text.rstrip(".") + "."

def run_dir_arg(argv: list[str]) -> str | None:
    """The literal `hydra.run.dir=` of a command line (None if absent or interpolated)."""
    for a in argv:
        if a.startswith("hydra.run.dir="):
            value = a.split("=", 1)[1]
            return None if "${" in value else value
    return None

def precheck(argv: list[str]) -> str | None:
    """Compose the config with the command line's overrides once, before Hydra does, and return
    a failure (unknown key, wrong type, unknown option, a cross-field rule, a bad init_from, a
    resume that cannot continue) as one sentence. None when the command can start."""
    if any(a in HYDRA_FLAGS or a.startswith("-") for a in argv):
        return None  # sweeps and Hydra's own flags: left to Hydra
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return one_sentence(e)
    try:  # the cross-field checks too, before Hydra creates a run dir for a run that cannot start
        cfg = apply_pretrained_config(cfg, overrides)  # a pretrained folder defines the architecture
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), launched_by_torchrun())
        check_init_from(cfg, overrides)
        _check_resume(cfg, run_dir_arg(argv))
    except ConfigError as e:
        return str(e)
    return None

def _check_resume(cfg, run_dir: str | None) -> None:
    """A resume that would be refused is refused now, before Hydra rewrites the run dir's `.hydra/`."""

    if run_dir is None and cfg.trainer.resume in ("auto", "never"):
        return  # a new timestamped run dir: nothing to resume
    ckpt_dir = os.path.join(os.path.abspath(run_dir), "checkpoints") if run_dir else ""  # "": a new dir
    resume_path = ckpt.find_resume(cfg.trainer.resume, ckpt_dir)
    if resume_path is None:
        return
    payload = ckpt.read_checkpoint(resume_path, {"structure": ckpt.structure(cfg)})
    check_resume(cfg, ckpt_dir, resume_path, payload)

def resume_command(run_dir: str, argv: list[str] | None = None) -> str:
    """The command line to paste to continue the run in `run_dir`: this process's own command
    (torchrun's form under torchrun) with `hydra.run.dir=<run_dir>` in place of any other."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in argv if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)} -m trainer"
            if "TORCHELASTIC_RUN_ID" in os.environ else "python -m trainer")
    return " ".join([head, *(shlex.quote(a) for a in args)])
