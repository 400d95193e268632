"""`python -m trainer [GROUP=OPTION ...] [key=value ...]`: the Hydra entry point."""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from trainer.config import ConfigError, register_configs

register_configs()
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXIT_BAD_INPUT, EXIT_NONFINITE = 2, 3


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; returns eval/loss, the metric a Hydra sweep optimizes."""
    from trainer.loop import NonFiniteLoss, StopRequested
    from trainer.run import run

    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except NonFiniteLoss as e:
        print(f"error: {e}; the last good checkpoint is kept.", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except StopRequested as e:
        name = "SIGTERM" if e.signum == 15 else "SIGINT" if e.signum == 2 else f"signal {e.signum}"
        print(f"stopped by {name} after step {e.step}; checkpoint saved, run again in the same run dir "
              f"to resume.", file=sys.stderr)
        sys.exit(128 + e.signum)
    print(f"run dir: {summary['run_dir']}  eval/loss {summary.get('eval/loss', float('nan')):.4f}  "
          f"summary: {os.path.join(summary['run_dir'], 'summary.json')}", file=sys.stderr)
    if "quantize" in summary:
        print(f"quantization report: {os.path.join(summary['run_dir'], 'quantize.md')}", file=sys.stderr)
    return float(summary.get("eval/loss", float("nan")))


if __name__ == "__main__":
    main()
