"""`python -m trainer.evaluate run_dir=... [data=... data.files=[...]]`: a run's model on any data.

The numbers come from `trainer.evaluation`, the loop's own evaluation (same held-out sample,
same fixed-seed masks, same precision), so on the run's own data they equal its final
`eval/loss`. Printed, and written to `output=<path.json>` (default `<run_dir>/eval_<name>.json`).
Every key, its default and its help: `conf/tools/evaluate.yaml`, or `python -m trainer.evaluate --help`.

    python -m trainer.evaluate run_dir=outputs/<date>/<time>                  # the run's held-out split
    python -m trainer.evaluate run_dir=... data=text 'data.files=[notes.md]'   # other data (split=all)
    python -m trainer.evaluate run_dir=... eval_batches=100000                  # every held-out block
"""
from __future__ import annotations

import json
import os
import re
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig
from trainer.evaluation import EvalContext, evaluate_all
from trainer.evaluation.heldout import HeldOutLoss
from trainer.evaluation.retrieval import RetrievalSearch
from trainer.objectives import build_objective, resolve_objective
from trainer.cli import apply_quantization
from trainer.distributed import resolve_device
from trainer.runs.artifacts import load_model
from trainer.quantize import apply_qat
from trainer.cli import compose_tool
from trainer.data import StoreBlocks, load_corpus
from trainer.data.pairs import load_pair_corpus
from trainer.cli import run_tool

TOOL = "evaluate"  # conf/tools/evaluate.yaml: every key, its default and its help line

def data_config(run_cfg: DictConfig, tool_cfg: DictConfig, given: frozenset[str]) -> DictConfig:
    """The data to evaluate on: the run's `data`, or the `data=<option>` group the tool composed
    (with the run's `data.seq_len`, the model's block length), with the `data.<key>=` overrides."""
    if "data" not in tool_cfg:
        return run_cfg.data
    overrides = tool_cfg.data
    try:
        if "data" in given:  # a conf/data option replaces the run's data; the block length stays the model's
            data = OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)
            if "data.seq_len" not in given:
                data.seq_len = run_cfg.data.seq_len
            return data
        return OmegaConf.merge(run_cfg.data, overrides)
    except Exception as e:
        key = next((f"data.{k}" for k in overrides if f"data.{k}" in given), "data")
        raise ConfigError(f"{key}={OmegaConf.select(tool_cfg, key)} is not valid: {str(e).splitlines()[0]}") from e

def evaluate_run(model: torch.nn.Module, cfg: DictConfig, blocks, device: torch.device,
                 precision: str, trainer_cfg, tokenizer=None, retrieval=None) -> dict[str, float]:
    """The run's evaluators (`trainer.evaluation`) on `blocks` ((N, seq_len + 1) tensor or memory-mapped
    StoreBlocks) with the run's objective and tokenizer: the loop's code path (eval/bits_per_byte
    included), plus the retrieval search when `retrieval` is given."""
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective, tokenizer)
    evaluators: list = [HeldOutLoss(objective, blocks, trainer_cfg.eval_batches)]
    if retrieval is not None:
        evaluators.append(RetrievalSearch(retrieval, objective.pad_id, objective.pooling))
    metrics = evaluate_all(evaluators, model, EvalContext(device, precision, batch_size=trainer_cfg.batch_size))
    assert metrics is not None  # no stop signal in a single process
    return metrics

def _name(name: str | None, data: DictConfig, changed: bool) -> str:
    if name:
        return name
    name = data.source
    if changed and data.source == "text" and data.files:
        name += "_" + os.path.splitext(os.path.basename(str(data.files[0])))[0]
    elif changed and data.source == "hub" and data.name:
        name += "_" + str(data.name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

def _load(a) -> tuple[torch.nn.Module, object, DictConfig, torch.device]:
    """The run's model (its QAT forward if trained so; quantized if asked), tokenizer, config, device."""

    device = resolve_device(a.device)
    model, tok, cfg = load_model(a.run_dir, device)
    if cfg.quantize.method == "qat_int8":  # the run evaluated its fake-quantized forward

        model = apply_qat(model, cfg.quantize)
    return apply_quantization(model, cfg, a.quantize, device), tok, cfg, device

def run_evaluate(argv: list[str]) -> dict:
    """Compose `conf/tools/evaluate.yaml` with `argv`, load, evaluate, print, and write the metrics
    JSON (`output=`, else `<run_dir>/eval_<name>.json`); returns the report.

    Raises:
        ConfigError: bad input (a key, value, run dir or data), before anything is written.
    """

    a, given = compose_tool(TOOL, argv)
    changed = "data" in a
    if not a.run_dir:
        raise ConfigError("run_dir=... is required: the directory of a finished training run.")
    if a.split not in (None, "val", "train", "all"):
        raise ConfigError(f"split={a.split} is not valid; choose val, train or all.")
    if a.precision not in (None, "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={a.precision} is not valid; choose fp32, bf16 or fp16.")
    if a.output is not None and not a.output.endswith(".json"):
        raise ConfigError(f"output={a.output} must end in .json (the metrics are written as JSON).")
    model, tok, cfg, device = _load(a)
    data = data_config(cfg, a, given)
    split = a.split or ("all" if changed and data.source != "pairs" else "val")
    retrieval = None
    if data.source == "pairs":  # retrieval pairs: the held-out queries searched against the held-out documents

        if split != "val":
            raise ConfigError(f"split={split} is not available for data=pairs; its evaluation is the held-out "
                              f"search (split=val).")
        pairs = load_pair_corpus(data, cfg.seed, tok)
        blocks, retrieval = pairs.val, pairs.retrieval
    else:
        corpus = load_corpus(data, cfg.seed, tokenizer=tok, say=lambda m: print(m, file=sys.stderr))
        blocks = {"val": corpus.val_blocks, "train": corpus.train_blocks}.get(split)
        if blocks is None:  # both splits: they are adjacent rows of the one memory map
            blocks = StoreBlocks(corpus.train_blocks.mm, 0, len(corpus.train_blocks) + len(corpus.val_blocks))
    if len(blocks) == 0:
        raise ConfigError(f"the {split} split of that data holds no block of {data.seq_len + 1} tokens; "
                          f"use split=all or more data.")
    trainer_cfg = OmegaConf.merge(cfg.trainer, {k: a[k] for k in ("batch_size", "eval_batches") if a[k]})
    precision = a.precision or cfg.precision.dtype
    metrics = evaluate_run(model, cfg, blocks, device, precision, trainer_cfg, tok, retrieval)
    run_dir = os.path.abspath(os.path.expanduser(a.run_dir))
    report = {**metrics, "run_dir": run_dir, "split": split, "precision": precision,
              "quantize": a.quantize, "data": OmegaConf.to_container(data, resolve=True)}
    path = os.path.abspath(os.path.expanduser(a.output)) if a.output else \
        os.path.join(run_dir, f"eval_{_name(a.name, data, changed)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    for k, v in metrics.items():
        print(f"{k:<20} {v:.6g}" if isinstance(v, float) else f"{k:<20} {v}")
    print(f"written to {path}", file=sys.stderr)
    return report

def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence;
    `--help` prints every key)."""

    return run_tool(TOOL, run_evaluate, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
