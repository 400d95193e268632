"""The sweep report: the Hydra callback that writes it after a multirun, and
`python -m trainer.sweep <sweep dir> [sweep.baseline=<overrides>] [sweep.metric=<key>]` that
rebuilds it from the sweep dir at any time (the report is a function of the job dirs alone, so it
is the same whichever launcher ran the jobs; see trainer/sweeps/report.py for the files).
"""
from __future__ import annotations

import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainer.errors import EXIT_BAD_INPUT
from trainer.sweeps.collect import COLUMNS, collect
from trainer.sweeps.launch import different_sweep, job_threads
from trainer.sweeps.report import write_report

__all__ = ["COLUMNS", "FAILED_IN_REPORT", "SweepReport", "collect", "main", "write_report"]

USAGE = ("usage: python -m trainer.sweep <sweep dir> [sweep.baseline=<overrides of one configuration>] "
         "[sweep.metric=<summary key>]")


class SweepReport(Callback):
    """Registered in conf/config.yaml under hydra.callbacks. At the start of a multirun it refuses a
    sweep dir that holds another command's sweep; each job of a parallel launcher gets its share of
    the cores (`trainer.sweeps.launch.job_threads`) unless `trainer.threads` is set; at the end
    (in the launching process, once every job has ended, for every launcher) it writes the report."""

    def __init__(self) -> None:
        self._threads: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = different_sweep(config.hydra.sweep.dir, list(config.hydra.overrides.task))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "trainer.threads") is not None:
            return
        threads = job_threads(OmegaConf.select(config, "hydra.launcher"))
        if threads:
            import torch  # the job is about to import it anyway; the report itself does not need it

            self._threads = torch.get_num_threads()
            torch.set_num_threads(threads)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._threads is not None:
            import torch  # already imported by on_job_start

            torch.set_num_threads(self._threads)
            self._threads = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            rows = write_report(sweep_dir)
        except ValueError as e:  # not raised without an explicit baseline; kept for safety
            print(f"error: {e}", file=sys.stderr)
            return
        FAILED_IN_REPORT[:] = [f"job {r['job']} ({r['overrides']}): {r['error']}" for r in rows if r["status"] == "failed"]
        if rows:
            print(f"sweep report: {os.path.join(sweep_dir, 'sweep.md')}")


# The failed jobs the last report of this process found, whichever launcher (and process) ran
# them: "job N (overrides): reason".
FAILED_IN_REPORT: list[str] = []


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.sweep <sweep dir> [sweep.baseline=...] [sweep.metric=...]`: rewrite the
    sweep's report files from its job dirs; exit 2 with one sentence on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nRewrites sweep.md, sweep.csv, sweep_stats.csv, sweep_curves.csv and sweep.png "
              "from the job dirs of <sweep dir>.", file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else EXIT_BAD_INPUT
    sweep_dir, options = argv[0], {}
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or key not in ("sweep.baseline", "sweep.metric", "baseline", "metric"):
            print(f"error: unknown argument {arg!r}; valid: sweep.baseline=<overrides> and "
                  f"sweep.metric=<summary key> ({USAGE}).", file=sys.stderr)
            return EXIT_BAD_INPUT
        options[key.removeprefix("sweep.")] = value
    if not os.path.isdir(sweep_dir):
        print(f"error: sweep dir {sweep_dir!r} does not exist; give the hydra.sweep.dir of a multirun.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        rows = write_report(sweep_dir, baseline=options.get("baseline"), metric=options.get("metric"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not rows:
        print(f"error: {sweep_dir} holds no job dir (a subdir with summary.json or .hydra/overrides.yaml); "
              f"give the hydra.sweep.dir of a multirun.", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"sweep report: {os.path.join(sweep_dir, 'sweep.md')} ({len(rows)} jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
