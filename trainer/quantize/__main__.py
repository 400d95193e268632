"""`python -m trainer.quantize run_dir=<run> quantize=<method> [quantize.<key>=<value> ...]`

Quantizes a finished run: reads its config and final weights (`trainer.runs.artifacts.read_run`:
model.safetensors, or `.hydra/config.yaml` and `model.pt` through weights_only), writes
`<run>/model_<method>.pt` and `<run>/quantize.md`, prints the report's tables and sets
summary.json's "quantize". Every key: `conf/tools/quantize.yaml` or `--help`. Bad input is one
sentence starting `error: ` on stderr and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.errors import ConfigError
from trainer.runs.artifacts import WEIGHTS, read_run
from trainer.objectives import resolve_objective
from trainer.quantize import METHODS
from trainer.quantize.report import quiet_report_warnings  # noqa: F401 (re-exported for tests)
from trainer.cli import compose_tool
from trainer.data import load_corpus
from trainer.distributed import resolve_device
from trainer.metrics import write_summary
from trainer.objectives import build_objective
from trainer.quantize import apply_qat, build_init_model
from trainer.quantize.post_training import post_training_report
from trainer.data import blocks_of
from trainer.runs.artifacts import load_tokenizer
from trainer.data.pairs import load_pair_corpus
from trainer.cli import run_tool

TOOL = "quantize"  # conf/tools/quantize.yaml: every key, its default and its help line
USAGE = "usage: python -m trainer.quantize run_dir=<run dir> quantize=<method> [quantize.compile=true|false|both]"
EXIT_BAD_INPUT = 2
def parse(argv: list[str]) -> tuple[str, DictConfig]:
    """(run_dir, the tool config composed from `conf/tools/quantize.yaml` with `argv`); ConfigError
    for an unknown key (with the nearest valid one), a missing run dir or method, or a dir that is
    not a finished run."""

    for arg in argv:  # the method first, in its own words (the group also holds `none`)
        key, _, value = arg.partition("=")
        if key == "quantize" and value not in METHODS:
            raise ConfigError(f"quantize={value!r} is not valid; choose one of: {', '.join(METHODS)}.")
    a, given = compose_tool(TOOL, argv)
    method = a.quantize.method if "quantize" in given else None
    if not a.run_dir or method is None:
        raise ConfigError(f"run_dir=... and quantize=... are both required; {USAGE}.")
    run_dir = a.run_dir
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir} is not a directory; point it at a finished training run.")
    if not os.path.isfile(os.path.join(run_dir, WEIGHTS)):  # older runs: the config and model.pt
        for need in (".hydra/config.yaml", "model.pt"):
            if not os.path.isfile(os.path.join(run_dir, need)):
                raise ConfigError(f"run_dir={run_dir} has no {need}; only a run that finished training "
                                  f"(it writes model.pt) can be quantized.")
    args = {k: OmegaConf.select(a, k) for k in sorted(given) if k.startswith(("quantize.", "trainer."))}
    device = args.pop("trainer.device", None) or a.device
    return run_dir, {"quantize": method, "trainer.device": device, **args}

def load_run_config(run_dir: str, args: dict) -> DictConfig:
    """The run's resolved config on today's schema (new keys take their defaults), with `args`
    ({dotted key: value}, "quantize" the method) set."""
    args = dict(args)
    _, cfg = read_run(run_dir)
    cfg.quantize.method = args.pop("quantize")
    for key, value in args.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except Exception as e:
            raise ConfigError(f"{key}={value} is not valid ({str(e).splitlines()[0]}).") from e
    return cfg

def quantize_run(run_dir: str, cfg) -> dict:
    """Quantize the run's final weights as `cfg.quantize` asks, on `cfg.trainer.device`; returns
    summary.json's "quantize" entry."""

    apply_qat(build_init_model(cfg), cfg.quantize)  # the report's settings, checked before any work
    device = resolve_device(cfg.trainer.device)
    weights, _ = read_run(run_dir)

    tokenizer = load_tokenizer(run_dir, cfg)
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective, tokenizer)
    old_threads = torch.get_num_threads()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    try:
        if cfg.data.source == "pairs":  # a retrieval encoder: the report also judges it by retrieval

            pairs = load_pair_corpus(cfg.data, cfg.seed, tokenizer)
            val, retrieval = pairs.val, pairs.retrieval
        else:
            val, retrieval = blocks_of(load_corpus(cfg.data, cfg.seed, tokenizer=tokenizer), "val"), None
        report = post_training_report(cfg, None, weights, val, objective, device, run_dir, retrieval=retrieval)
    finally:
        torch.set_num_threads(old_threads)
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
        summary["quantize"] = report
        write_summary(path, summary)
    return report

def run_quantize(argv: list[str]) -> dict:
    """Compose, check, quantize and print the report's tables; returns summary.json's "quantize"."""
    run_dir, args = parse(argv)
    cfg = load_run_config(run_dir, args)
    report = quantize_run(run_dir, cfg)  # prints its tables (post_training_report)
    print(f"quantization report: {os.path.join(run_dir, 'quantize.md')} ({report['method']}: "
          f"{report['size_ratio']:.2f}x smaller, {report['speedup']:.2f}x fp32 speed)", file=sys.stderr)
    return report

def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence;
    `--help` prints every key)."""

    return run_tool(TOOL, run_quantize, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
