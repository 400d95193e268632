"""Shared fixtures: the real config composed through Hydra's compose API, at tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from trainer.config.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()

# Tiny, fast, CPU: every test run composes the real config and then shrinks it with these.
TINY = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.d_ff=64",
    "data.seq_len=32", "data.max_files=30", "trainer.batch_size=8", "trainer.max_steps=6",
    "trainer.eval_every=3", "trainer.eval_batches=2", "trainer.log_every=2", "trainer.checkpoint_every=3",
    "trainer.progress=false", "trainer.device=cpu", "schedule.warmup_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One corpus cache for the whole session (built once, then loaded from disk)."""
    cache = os.environ.get("TRAINER_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["TRAINER_CACHE"] = cache


def compose_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    """The real config (conf/config.yaml + schema) with `overrides` applied after the tiny ones."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[*(TINY if tiny else []), *overrides])


@pytest.fixture
def make_cfg():
    return compose_cfg


def run_cli(*args: str, cwd: str | Path = ROOT, env: dict | None = None, timeout: int = 300,
            module: str = "trainer") -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in a subprocess; returns the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_cli_args(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"hydra.run.dir={run_dir}", *extra]

