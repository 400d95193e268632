"""The project's error types and the process exit codes they map to.

A leaf module: it imports nothing of ours, so every other module can raise these without
creating an import cycle.
"""
from __future__ import annotations

EXIT_BAD_INPUT = 2  # a ConfigError: bad key, value, file or combination; nothing was written
EXIT_NONFINITE = 3  # the loss became NaN/inf; the last good checkpoint is kept
EXIT_FAILED_SWEEP = 1  # one or more multirun jobs failed (each recorded in the sweep report)


class ConfigError(ValueError):
    """Bad user input: the message is one sentence naming the key and what is valid."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the run stops before the optimizer step."""


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; the step finished and a checkpoint was written.

    Attributes:
        signum: the signal number (15 SIGTERM, 2 SIGINT); the process exits 128 + signum.
        step: the last completed optimizer step (the checkpoint's step).
    """

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step
