"""Benchmark the quantization methods side by side on the reference-size decoder.

Usage:
    python scripts/bench_quantize.py [--weights RUN_DIR/model.pt] [--device cpu|cuda] [--threads N]
        [--eval-batches 4] [--latency-batches 5] [--group-size 32] [--kernels auto|fused|reference]
        [--bf16-quant] [--out table.md]

Trains nothing. Builds the `experiment=bench_ref` decoder (d_model 384, 6 layers, 6 heads,
d_ff 1536, seq 256, batch 8) with random init or `--weights` (a plain state_dict such as a run's
model.pt, same sizes), then measures in one process, on the same validation batches:
fp32, bf16 (autocast; weights stay fp32), dynamic_int8, weight_int8 and weight_int4
(`--bf16-quant` adds the weight-only variants under bf16 autocast, where torch's fused CPU
int8/int4 kernels apply). Columns as in a run's quantize.md: serialized state_dict size,
median forward+loss latency (variants interleaved per batch), eval loss and token accuracy.
With random weights the quality columns only show how far the outputs move, not a real loss.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from hydra import compose, initialize_config_dir  # noqa: E402

from trainer.config import register_configs  # noqa: E402
from trainer.data import load_corpus  # noqa: E402
from trainer.objectives import CausalLM  # noqa: E402
from trainer.qlinear import KERNEL_POLICIES, kernel_policy  # noqa: E402
from trainer.quantize import (apply_ptq, build_float_model, build_init_model, compare_variants,  # noqa: E402
                              format_table)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="a plain state_dict (e.g. a bench_ref run's model.pt); default: random init")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--latency-batches", type=int, default=5)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--kernels", default="auto", choices=KERNEL_POLICIES)
    p.add_argument("--bf16-quant", action="store_true", help="also weight_int8/int4 under bf16 autocast")
    p.add_argument("--max-files", type=int, default=200, help="stdlib files for the validation corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this markdown file")
    return p.parse_args(argv)


def build_variants(cfg, weights: dict | None, group_size: int, device: torch.device,
                   bf16_quant: bool) -> dict[str, tuple[torch.nn.Module, str]]:
    """(model, precision) per row: fp32, bf16 autocast and the three post-training methods."""
    torch.manual_seed(cfg.seed)
    fp32 = (build_float_model(cfg, weights) if weights is not None else build_init_model(cfg).eval()).to(device)
    variants = {"fp32": (fp32, "fp32"), "bf16 (autocast)": (fp32, "bf16")}
    for method in ("dynamic_int8", "weight_int8", "weight_int4"):
        variants[method] = (apply_ptq(copy.deepcopy(fp32), method, group_size), "fp32")
        if bf16_quant and method != "dynamic_int8":
            variants[f"{method} + bf16"] = (variants[method][0], "bf16")
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
    variants = build_variants(cfg, weights, args.group_size, device, args.bf16_quant)
    val = load_corpus(cfg.data, cfg.seed).val
    with kernel_policy(args.kernels):
        rows = compare_variants(variants, CausalLM(), val, cfg.trainer.batch_size, args.eval_batches,
                                args.latency_batches, device)
    batches = rows.pop("_batches")
    m = cfg.model
    title = (f"Reference decoder d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, d_ff {m.d_ff}, "
             f"seq {cfg.data.seq_len}, batch {cfg.trainer.batch_size}; weights: {args.weights or 'random init'}; "
             f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, kernels={args.kernels}; "
             f"quality on {batches['eval']} batches, latency median of {batches['latency']}.")
    table = title + "\n\n" + format_table(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
