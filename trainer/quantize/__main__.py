"""`python -m trainer.quantize run_dir=<run> quantize=<method> [quantize.<key>=<value> ...]`

Quantizes a finished run: reads `<run>/.hydra/config.yaml` and `<run>/model.pt` (weights_only),
writes `<run>/model_<method>.pt` and `<run>/quantize.md`, and sets summary.json's "quantize".
Bad input is one sentence starting `error: ` on stderr and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from omegaconf import OmegaConf

from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.objectives import resolve_objective
from trainer.quantize import METHODS

USAGE = "usage: python -m trainer.quantize run_dir=<run dir> quantize=<method> [quantize.compile=true|false|both]"
KEYS = ("quantize.compile", "quantize.eval_batches", "quantize.latency_batches", "quantize.group_size",
        "trainer.threads", "trainer.device")
EXIT_BAD_INPUT = 2


def parse(argv: list[str]) -> tuple[str, dict[str, str]]:
    """(run_dir, {dotted key: value}) from `key=value` arguments; ConfigError for anything else."""
    args: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in ("run_dir", "quantize", *KEYS):
            raise ConfigError(f"argument {arg!r} is not understood; {USAGE} (other keys: {', '.join(KEYS)}).")
        args[key] = value
    if "run_dir" not in args or "quantize" not in args:
        raise ConfigError(f"run_dir=... and quantize=... are both required; {USAGE}.")
    if args["quantize"] not in METHODS:
        raise ConfigError(f"quantize={args['quantize']!r} is not valid; choose one of: {', '.join(METHODS)}.")
    run_dir = args.pop("run_dir")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir} is not a directory; point it at a finished training run.")
    for need in (".hydra/config.yaml", "model.pt"):
        if not os.path.isfile(os.path.join(run_dir, need)):
            raise ConfigError(f"run_dir={run_dir} has no {need}; only a run that finished training "
                              f"(it writes model.pt) can be quantized.")
    return run_dir, args


def load_run_config(run_dir: str, args: dict[str, str]):
    """The run's resolved config on today's schema (new keys take their defaults), with `args` set."""
    saved = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    except Exception as e:
        raise ConfigError(f"{run_dir}/.hydra/config.yaml does not match this trainer's config schema "
                          f"({str(e).splitlines()[0]}).") from e
    cfg.quantize.method = args.pop("quantize")
    try:
        for key, value in args.items():
            OmegaConf.update(cfg, key, None if value in ("null", "None") else value, merge=False)
    except Exception as e:
        raise ConfigError(f"{key}={value} is not valid ({str(e).splitlines()[0]}).") from e
    return cfg


def quantize_run(run_dir: str, cfg) -> dict:
    """Quantize `<run_dir>/model.pt` as `cfg.quantize` asks; returns summary.json's "quantize" entry."""
    from trainer.runs.checkpoints import safe_load
    from trainer.data import load_corpus
    from trainer.metrics import write_summary
    from trainer.objectives import build_objective
    from trainer.quantize import apply_qat, build_init_model, post_training_report

    apply_qat(build_init_model(cfg), cfg.quantize)  # the report's settings, checked before any work
    weights = safe_load(os.path.join(run_dir, "model.pt"), what="weights")
    cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    from trainer.data import blocks_of
    from trainer.runs.artifacts import load_tokenizer

    tokenizer = load_tokenizer(run_dir, cfg)
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective, tokenizer)
    old_threads = torch.get_num_threads()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    try:
        if cfg.data.source == "pairs":  # a retrieval encoder: the report also judges it by retrieval
            from trainer.data.pairs import load_pair_corpus

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


def main(argv: list[str]) -> int:
    """The command line; returns the exit status."""
    try:
        run_dir, args = parse(argv)
        report = quantize_run(run_dir, load_run_config(run_dir, args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"quantization report: {os.path.join(run_dir, 'quantize.md')} ({report['method']}: "
          f"{report['size_ratio']:.2f}x smaller, {report['speedup']:.2f}x fp32 speed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
