"""`python -m trainer [GROUP=OPTION ...] [key=value ...]`: the Hydra entry point."""
from __future__ import annotations

import json
import os
import sys

import hydra
from omegaconf import DictConfig

from trainer.config.schema import CONF_DIR, register_configs
from trainer.errors import EXIT_BAD_INPUT, EXIT_FAILED_SWEEP, EXIT_NONFINITE, ConfigError, NonFiniteLoss, StopRequested
from trainer.metrics import write_summary
from trainer.run import hydra_run_dir
from trainer.command import resume_command
from trainer.run import run
from trainer.runs.summary import closing_lines
from trainer.sweep import write_report
from trainer.command import precheck
from trainer.sweep import FAILED_IN_REPORT

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

    multi, label = _multirun_job()
    print(message, file=sys.stderr)
    if not multi:
        sys.exit(exit_code)
    FAILED_JOBS.append(f"{label}: {message.removeprefix('error: ')}")
    failure = {"status": "failed", "error": message.removeprefix("error: "), "exit_code": exit_code}
    path = os.path.join(hydra_run_dir(), "summary.json")
    try:
        with open(path) as f:
            finished = json.load(f).get("complete", False)
    except (OSError, ValueError):
        finished = False
    try:  # a finished job's result is never overwritten: the failure goes beside it
        write_summary(os.path.join(hydra_run_dir(), "failure.json") if finished else path, failure)
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

    try:
        summary = run(cfg)
    except ConfigError as e:
        return _record_failure(f"error: {e}", EXIT_BAD_INPUT)
    except NonFiniteLoss as e:
        return _record_failure(f"error: {e}; the last good checkpoint is kept.", EXIT_NONFINITE)
    except StopRequested as e:

        name = "SIGTERM" if e.signum == 15 else "SIGINT" if e.signum == 2 else f"signal {e.signum}"
        multi, _ = _multirun_job()
        again = ("run the same sweep command again" if multi else
                 f"to resume, run: {resume_command(hydra_run_dir())}")
        print(f"stopped by {name} after step {e.step}; checkpoint saved; {again}", file=sys.stderr)
        if multi:  # the sweep ends here: report the jobs that finished
            from hydra.core.hydra_config import HydraConfig

            write_report(HydraConfig.get().sweep.dir)
        sys.exit(128 + e.signum)
    except Exception as e:  # a bug, not bad input: show it; in a sweep, the other jobs still run
        if not _multirun_job()[0]:
            raise
        import traceback

        traceback.print_exc()
        return _record_failure(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        pass
    elif summary.get("already_complete"):
        steps = summary["steps"]
        print(f"run dir {summary['run_dir']} is already complete at step {steps} (trainer.max_steps={steps}); "
              f"nothing to do. To train it further, raise trainer.max_steps: "
              f"{resume_command(summary['run_dir'])} trainer.max_steps={max(2 * steps, 1)}", file=sys.stderr)
    elif summary["complete"]:
        print("\n".join(closing_lines(summary)), file=sys.stderr)
    else:
        print(f"run dir: {summary['run_dir']}  paused at step {summary['steps']} (trainer.steps_per_run); to "
              f"continue, run: {resume_command(summary['run_dir'])}", file=sys.stderr)
    metric = cfg.sweep.metric if "sweep" in cfg else "eval/loss"  # what a sweeper (e.g. Optuna) optimizes
    return float(summary.get(metric, float("nan"))) if summary["complete"] else float("nan")

if __name__ == "__main__":

    problem = precheck(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    main()

    failed = FAILED_JOBS or FAILED_IN_REPORT
    if failed:
        print(f"error: {len(failed)} sweep job(s) failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(EXIT_FAILED_SWEEP)
