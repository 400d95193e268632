"""`python -m trainer [GROUP=OPTION ...] [key=value ...]`: the Hydra entry point."""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from trainer.config.schema import CONF_DIR, register_configs
from trainer.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, ConfigError, NonFiniteLoss, StopRequested

register_configs()


FAILED_JOBS: list[str] = []  # multirun jobs of this process that failed: "job N (overrides): reason"


def _multirun_job() -> tuple[bool, str]:
    """(whether this job is one of a multirun, its label "job N (overrides)")."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return False, ""
    return True, f"job {hc.job.num} ({' '.join(hc.overrides.task)})"


def _record_failure(message: str, exit_code: int) -> float:
    """A failed multirun job: its row in the sweep report says so; the other jobs still run."""
    from trainer.metrics import write_summary
    from trainer.run import hydra_run_dir

    multi, label = _multirun_job()
    print(message, file=sys.stderr)
    if not multi:
        sys.exit(exit_code)
    FAILED_JOBS.append(f"{label}: {message.removeprefix('error: ')}")
    try:
        write_summary(os.path.join(hydra_run_dir(), "summary.json"),
                      {"status": "failed", "error": message.removeprefix("error: "), "exit_code": exit_code})
    except OSError:
        pass
    return float("nan")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; returns eval/loss, the metric a Hydra sweep optimizes.

    A single run exits 2 on bad input, 3 on a non-finite loss, 128+signal when stopped. In a
    multirun a failing job is recorded (its sweep row says failed, with the reason) and the
    remaining jobs run; the sweep then exits 1. A stop signal ends the whole sweep.
    """
    from trainer.run import run

    try:
        summary = run(cfg)
    except ConfigError as e:
        return _record_failure(f"error: {e}", EXIT_BAD_INPUT)
    except NonFiniteLoss as e:
        return _record_failure(f"error: {e}; the last good checkpoint is kept.", EXIT_NONFINITE)
    except StopRequested as e:
        name = "SIGTERM" if e.signum == 15 else "SIGINT" if e.signum == 2 else f"signal {e.signum}"
        print(f"stopped by {name} after step {e.step}; checkpoint saved, run again in the same run dir "
              f"to resume.", file=sys.stderr)
        multi, _ = _multirun_job()
        if multi:  # the sweep ends here: report the jobs that finished
            from hydra.core.hydra_config import HydraConfig

            from trainer.sweep import write_report

            write_report(HydraConfig.get().sweep.dir)
        sys.exit(128 + e.signum)
    except Exception as e:  # a bug, not bad input: show it; in a sweep, the other jobs still run
        if not _multirun_job()[0]:
            raise
        import traceback

        traceback.print_exc()
        return _record_failure(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1)
    if summary["complete"]:
        print(f"run dir: {summary['run_dir']}  eval/loss {summary.get('eval/loss', float('nan')):.4f}  "
              f"summary: {os.path.join(summary['run_dir'], 'summary.json')}", file=sys.stderr)
    else:
        print(f"run dir: {summary['run_dir']}  paused at step {summary['steps']} (trainer.steps_per_run); "
              f"run the same command again to continue.", file=sys.stderr)
    if "quantize" in summary:
        print(f"quantization report: {os.path.join(summary['run_dir'], 'quantize.md')}", file=sys.stderr)
    return float(summary.get("eval/loss", float("nan"))) if summary["complete"] else float("nan")


def _override_error(argv: list[str]) -> str | None:
    """Compose the config with the command line's overrides once, before Hydra does, and turn a
    failure (unknown key, wrong type, unknown option) into one sentence. None when it composes."""
    if any(a in ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info")
           or a.startswith("-") for a in argv):
        return None  # sweeps and Hydra's own flags: left to Hydra
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config.validate import validate
    from trainer.distributed import launched_by_torchrun

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return _one_sentence(e)
    try:  # the cross-field checks too, before Hydra creates a run dir for a run that cannot start
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), launched_by_torchrun())
        from trainer.runs.init_from import check_init_from

        check_init_from(cfg)
    except ConfigError as e:
        return str(e)
    return None


def _one_sentence(e: BaseException) -> str:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, ValidationError

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    import re

    found = re.search(r"full_key: (\S+)", str(e)) or re.search(r"full_key: (\S+)", str(root))
    key = getattr(root, "full_key", None) or (found.group(1) if found else None)
    text = str(root).splitlines()[0] if str(root) else type(root).__name__
    if isinstance(root, MissingConfigException) or "Could not find" in text:
        group = (getattr(root, "config_name", None) or "").split("/")[0]
        options = [o for o in getattr(root, "options", None) or []]
        valid = f"; choose one of: {', '.join(options)}" if options else ""
        return f"{text.replace('In ' + chr(39) + 'config' + chr(39) + ': ', '')}{valid}."
    if (isinstance(root, ConfigKeyError) or " not in " in text) and key:
        return f"{key} is not a config key ({text}); `python -m trainer --cfg job` lists them all."
    if isinstance(root, ValidationError) and key:
        return f"{key} has the wrong type: {text}."
    return text.rstrip(".") + "."


if __name__ == "__main__":
    problem = _override_error(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    main()
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} sweep job(s) failed: " + "; ".join(FAILED_JOBS), file=sys.stderr)
        sys.exit(1)
