"""Benchmark the quantization methods side by side on the reference-size decoder.

Usage:
    python scripts/bench_quantize.py [--weights RUN_DIR/model.pt] [--device cpu|cuda] [--threads N]
        [--eval-batches 4] [--latency-batches 5] [--group-size 32] [--compile both|true|false]
        [--precision fp32|bf16] [--out table.md]

Trains nothing. Builds the `experiment=bench_ref` decoder (d_model 384, 6 layers, 6 heads,
d_ff 1536, seq 256, batch 8) with random init or `--weights` (a plain state_dict such as a run's
model.pt, same sizes), then measures in one process, on the same validation batches, the rows a
run's quantize.md has: fp32, bf16 weights, and every method (dynamic_int8, weight_int8,
weight_int4, qat_int8 converted from the same weights), each eager and under torch.compile.
With random weights the quality columns only show how far the outputs move, not a real loss.
The table goes to stdout and to docs/benchmarks/quantize_<hardware>_<date>.md (scripts/_report.py).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from _report import write_result  # noqa: E402
from trainer.config.schema import register_configs  # noqa: E402
from trainer.data import load_corpus  # noqa: E402
from trainer.objectives import CausalLM  # noqa: E402
from trainer.quantize import (METHODS, apply_ptq, apply_qat, build_float_model, build_init_model,  # noqa: E402
                              compare_variants, cpu_flags, format_table, plan)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="a plain state_dict (e.g. a bench_ref run's model.pt); default: random init")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--latency-batches", type=int, default=5)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--compile", default="both", choices=["both", "true", "false"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast for the int variants")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--max-files", type=int, default=200, help="stdlib files for the validation corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this markdown file")
    return p.parse_args(argv)


def build_variants(cfg, weights: dict | None, args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """(model, precision, info) per row: fp32, bf16 weights and each method."""
    torch.manual_seed(cfg.seed)
    fp32 = (build_float_model(cfg, weights) if weights is not None else build_init_model(cfg).eval()).to(device)
    dense = {"library": "torch", "config": "-", "fallback": ""}
    variants = {"fp32": (fp32, "fp32", {**dense, "kernel": "dense matmul"}),
                "bf16 weights": (copy.deepcopy(fp32).to(torch.bfloat16), "fp32",
                                 {**dense, "config": "model.to(bfloat16)", "kernel": "dense bf16 matmul"})}
    for method in args.methods:
        model = copy.deepcopy(fp32)
        if method == "qat_int8":  # prepare + convert on the same weights: the converted arithmetic
            model = apply_qat(model, OmegaConf.merge(cfg.quantize, {"method": "qat_int8"}))
        info = plan(method, device, args.group_size, args.precision)
        variants[method] = (apply_ptq(model, method, args.group_size), args.precision, info)
    return variants


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; prints and returns the markdown table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=bench_ref", f"seed={args.seed}",
                                                       f"data.max_files={args.max_files}"])
    device = torch.device(args.device)
    weights = torch.load(args.weights, map_location="cpu", weights_only=True) if args.weights else None
    variants = build_variants(cfg, weights, args, device)
    val = load_corpus(cfg.data, cfg.seed).val
    rows = compare_variants(variants, CausalLM(), val, cfg.trainer.batch_size, args.eval_batches,
                            args.latency_batches, device, compile=args.compile)
    batches = rows.pop("_batches")
    m = cfg.model
    where = cpu_flags() if device.type == "cpu" else torch.cuda.get_device_name(device)
    title = (f"Reference decoder d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, d_ff {m.d_ff}, "
             f"seq {cfg.data.seq_len}, batch {cfg.trainer.batch_size}; weights: {args.weights or 'random init'}; "
             f"device {device} ({where}), torch {torch.__version__}, torchao {_torchao_version()}, "
             f"{torch.get_num_threads()} threads, int variants under {args.precision}; quality on "
             f"{batches['eval']} batches, latency median of {batches['latency']}; speedup vs {batches['baseline']}.")
    table = title + "\n\n" + format_table(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    write_result("quantize", table, device=device)
    return table


def _torchao_version() -> str:
    import torchao

    return torchao.__version__


if __name__ == "__main__":
    main()
