"""`python -m trainer.evaluate run_dir=... [data=... data.files=[...]]`: a run's model on any data.

The numbers come from `trainer.evaluation`, the loop's own evaluation (same held-out sample,
same fixed-seed masks, same precision), so on the run's own data they equal its final
`eval/loss`. Printed, and written to `<run_dir>/eval_<name>.json`.

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
from trainer.config.schema import CONF_DIR, DataConfig
from trainer.evaluation import EvalContext, evaluate_all
from trainer.evaluation.heldout import HeldOutLoss
from trainer.evaluation.retrieval import RetrievalSearch
from trainer.objectives import build_objective, resolve_objective

SPEC = {"run_dir": (str, None), "name": (str, None), "split": (str, None), "batch_size": (int, None),
        "eval_batches": (int, None), "precision": (str, None), "device": (str, "auto"), "quantize": (str, "none")}


def apply_data_overrides(run_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's `data` config with `data=<option>` (a conf/data group) and `data.key=value`
    overrides applied; `data.seq_len` stays the run's unless overridden."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    data = run_cfg.data
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(f"bad data override in {' '.join(overrides)}: {str(e).splitlines()[0]}") from e
    for o in parsed:
        key, value = o.key_or_group, o.value()
        if key == "data":
            path = os.path.join(CONF_DIR, "data", f"{value}.yaml")
            if not os.path.isfile(path):
                options = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "data")) if f.endswith(".yaml"))
                raise ConfigError(f"data={value} is not a data option; choose one of: {', '.join(options)}.")
            seq_len = data.seq_len
            data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
            data.seq_len = seq_len  # the model's block length
    for o in parsed:
        key, value = o.key_or_group, o.value()
        if key != "data":
            sub = key.removeprefix("data.")
            if sub not in DataConfig.__dataclass_fields__:
                raise ConfigError(f"{key} is not a data key; valid: "
                                  f"{', '.join('data.' + k for k in DataConfig.__dataclass_fields__)}.")
            try:
                OmegaConf.update(data, sub, value, merge=False)
            except Exception as e:
                raise ConfigError(f"{key}={value} is not valid: {str(e).splitlines()[0]}") from e
    return data


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


def _name(a: dict, data: DictConfig, changed: bool) -> str:
    if a["name"]:
        return a["name"]
    name = data.source
    if changed and data.source == "text" and data.files:
        name += "_" + os.path.splitext(os.path.basename(str(data.files[0])))[0]
    elif changed and data.source == "hub" and data.name:
        name += "_" + str(data.name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_evaluate(argv: list[str]) -> dict:
    """Parse, load, evaluate, print and write `eval_<name>.json`; returns the report."""
    from trainer.cli import parse_args
    from trainer.data import StoreBlocks, load_corpus
    from trainer.runs.artifacts import load_model

    a, raw = parse_args(argv, SPEC, "python -m trainer.evaluate", passthrough=("data",))
    if not a["run_dir"]:
        raise ConfigError("run_dir=... is required: the directory of a finished training run.")
    if a["split"] not in (None, "val", "train", "all"):
        raise ConfigError(f"split={a['split']} is not valid; choose val, train or all.")
    if a["device"] not in ("auto", "cpu", "cuda") or (a["device"] == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"device={a['device']} is not available; use auto, cpu or cuda (with a GPU).")
    if a["precision"] not in (None, "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={a['precision']} is not valid; choose fp32, bf16 or fp16.")
    device = torch.device("cuda" if a["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    model, tok, cfg = load_model(a["run_dir"], device)
    if cfg.quantize.method == "qat_int8":  # the run evaluated its fake-quantized forward
        from trainer.quantize import apply_qat

        model = apply_qat(model, cfg.quantize)
    if a["quantize"] != "none":
        from trainer.quantize import apply_ptq

        try:
            model = apply_ptq(model.cpu(), a["quantize"], cfg.quantize.group_size).to(device).eval()
        except Exception as e:  # noqa: BLE001 - any failure is one sentence
            raise ConfigError(f"quantize={a['quantize']} could not be applied: {str(e).splitlines()[0]}") from e
    data = apply_data_overrides(cfg, raw) if raw else cfg.data
    split = a["split"] or ("all" if raw and data.source != "pairs" else "val")
    retrieval = None
    if data.source == "pairs":  # retrieval pairs: the held-out queries searched against the held-out documents
        from trainer.data.pairs import load_pair_corpus

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
    precision = a["precision"] or cfg.precision.dtype
    metrics = evaluate_run(model, cfg, blocks, device, precision, trainer_cfg, tok, retrieval)
    name = _name(a, data, bool(raw))
    report = {**metrics, "run_dir": os.path.abspath(a["run_dir"]), "split": split, "precision": precision,
              "quantize": a["quantize"], "data": OmegaConf.to_container(data, resolve=True)}
    path = os.path.join(os.path.abspath(a["run_dir"]), f"eval_{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for k, v in metrics.items():
        print(f"{k:<20} {v:.6g}" if isinstance(v, float) else f"{k:<20} {v}")
    print(f"written to {path}", file=sys.stderr)
    return report


def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence)."""
    from trainer.cli import run_tool

    return run_tool(run_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
