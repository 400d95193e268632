"""Post-training quantization (PTQ), quantization-aware training (QAT), and the PTQ report.

Only the nn.Linear layers inside the transformer blocks are quantized (attention qkv/q/kv/out,
feed-forward up/down): they hold nearly all the weights and FLOPs. The token embedding (and
the LM head tied to it), norms and position parameters stay in full precision.

  dynamic_int8  int8 weights per output channel, int8 activations per token at run time
  weight_int8   int8 weights per output channel, float activations
  weight_int4   int4 weights per group of `group_size` inputs (asymmetric), float activations
  qat_int8      train with fake-quantized (int8) weights and activations, then convert to
                dynamic_int8, the arithmetic the training simulated
"""
from __future__ import annotations

import copy
import io
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

from models.blocks import Block
from models.build import build_model
from trainer.config import ConfigError
from trainer.data import VOCAB_SIZE
from trainer.heldout import eval_sample
from trainer.loop import EVAL_SEED  # same masks as the logged eval/loss
from trainer.objectives import Objective
from trainer.precision import autocast
from trainer.qlinear import (INT4_FUSED_GROUPS, DynamicInt8Linear, FakeQuantLinear, Int4WeightLinear,
                             Int8WeightLinear, QuantLinear)

PTQ_METHODS = ("dynamic_int8", "weight_int8", "weight_int4")
FULL_PRECISION = "token embedding and LM head (tied by default), norms, position parameters"
MB = 1e6


# ---------------------------------------------------------------- model transforms

def _block_children(model: nn.Module, types: tuple) -> list[tuple[str, nn.Module, str, nn.Module]]:
    found = []
    for block_name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for parent_name, parent in block.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, types):
                    found.append((".".join(p for p in (block_name, parent_name, attr) if p), parent, attr, child))
    return found


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent module, attribute, layer) of every nn.Linear inside a Block."""
    return _block_children(model, (nn.Linear,))


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for _, parent, attr, linear in block_linears(model):
        setattr(parent, attr, make(linear))
    return model


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ConfigError unless `group_size` (even, > 0) divides every block layer's input size."""
    sizes = sorted({lin.in_features for *_, lin in block_linears(model)})
    if group_size <= 0 or group_size % 2 or any(k % group_size for k in sizes):
        fits = [str(g) for g in (16, *INT4_FUSED_GROUPS) if all(k % g == 0 for k in sizes)]
        raise ConfigError(f"quantize.group_size={group_size} must be even and divide every quantized "
                          f"layer's input size ({', '.join(map(str, sizes))})"
                          + (f"; e.g. {' or '.join(fits)}." if fits else "."))


def apply_ptq(model: nn.Module, method: str, group_size: int = 32) -> nn.Module:
    """Replace the block Linear layers of `model` (in place) by quantized ones; returns it.

    Args:
        model: a float model (plain or with FakeQuantLinear layers from apply_qat).
        method: dynamic_int8 | weight_int8 | weight_int4 (qat_int8 converts as dynamic_int8).
        group_size: weight_int4 only: inputs per scale/zero pair.
    """
    method = "dynamic_int8" if method == "qat_int8" else method
    if method == "weight_int4":
        check_group_size(model, group_size)
        return _swap_linears(model, lambda lin: Int4WeightLinear.from_float(lin, group_size))
    if method not in ("dynamic_int8", "weight_int8"):
        raise ConfigError(f"quantize={method!r} is not a post-training method; choose one of: "
                          f"{', '.join(PTQ_METHODS)}.")
    cls = DynamicInt8Linear if method == "dynamic_int8" else Int8WeightLinear
    return _swap_linears(model, cls.from_float)


def apply_qat(model: nn.Module, cfg) -> nn.Module:
    """Prepare `model` for training under `cfg` (= cfg.quantize).

    qat_int8: block Linear layers become FakeQuantLinear (same parameters and names). Other
    methods: the model is returned unchanged, after the settings the post-training report will
    need are checked, so a bad one fails before training rather than after.
    """
    if cfg.method != "none" and ((cfg.eval_batches is not None and cfg.eval_batches < 1)
                                 or cfg.latency_batches < 1):
        raise ConfigError(f"quantize.eval_batches={cfg.eval_batches} and quantize.latency_batches="
                          f"{cfg.latency_batches} must both be >= 1.")
    if cfg.method == "weight_int4":
        check_group_size(model, cfg.group_size)
    if cfg.method != "qat_int8":
        return model
    return _swap_linears(model, lambda lin: lin if isinstance(lin, FakeQuantLinear)
                         else FakeQuantLinear.from_float(lin))


def finalize_qat(model: nn.Module, weights: dict) -> dict:
    """The trained QAT weights as a plain state_dict for an unquantized build_model(...) model.

    FakeQuantLinear keeps nn.Linear's parameter names and adds no state, so this is a check
    plus a shallow copy; the fake-quant rounding is re-applied at conversion time.
    """
    expected = set(model.state_dict())
    if set(weights) != expected:
        raise RuntimeError(f"QAT weights do not match the model's keys: "
                           f"{sorted(set(weights) ^ expected)[:5]}")
    return dict(weights)


def build_init_model(cfg) -> nn.Module:
    """A freshly initialized unquantized model for root config `cfg` (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                           max_len=cfg.data.seq_len)


def build_float_model(cfg, weights: dict) -> nn.Module:
    """An unquantized model for root config `cfg`, loaded with the plain state_dict `weights`."""
    model = build_init_model(cfg)
    model.load_state_dict(weights)
    return model.eval()


def load_quantized(path: str, cfg, method: str | None = None) -> nn.Module:
    """Load a `model_<method>.pt` written by post_training_report.

    Args:
        path: the file. cfg: the run's root config (model sizes, quantize.group_size).
        method: the quantization in the file; default cfg.quantize.method.
    """
    model = apply_ptq(build_init_model(cfg), method or cfg.quantize.method, cfg.quantize.group_size)
    from trainer.checkpoint import safe_load

    model.load_state_dict(safe_load(path, what="quantized weights"))
    return model.eval()


def state_dict_bytes(state: dict) -> int:
    """Bytes of `state` serialized with torch.save (what a checkpoint file would take)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


def linear_state(model: nn.Module) -> dict:
    """The state_dict entries of the block Linear layers (quantized or not) only."""
    prefixes = tuple(name + "." for name, *_ in _block_children(model, (nn.Linear, QuantLinear)))
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


# ---------------------------------------------------------------- measurement

def prepare_batches(objective: Objective, val_blocks: torch.Tensor, batch_size: int, num_batches: int,
                    seed: int = EVAL_SEED) -> list[dict]:
    """The held-out sample the training loop evaluates (`trainer.heldout.eval_sample`: spread over
    the whole split), prepared with a fixed-seed generator, so every variant sees the same inputs
    and, for masked objectives, the same masks."""
    gen = torch.Generator().manual_seed(seed)
    return [objective.prepare(blocks, gen) for blocks in eval_sample(val_blocks, batch_size, num_batches)]


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_quality(model: nn.Module, objective: Objective, batches: list[dict], device: torch.device,
                     precision: str = "fp32") -> tuple[float, float]:
    """(mean loss per target, token accuracy) of `model` over `batches`."""
    loss = correct = targets = 0.0
    for batch in batches:
        with autocast(precision, device):
            ls, c = objective.loss(model, _on(batch, device))
        loss, correct = loss + float(ls), correct + float(c)
        targets += objective.num_targets(batch)
    return loss / max(targets, 1), correct / max(targets, 1)


@torch.no_grad()
def measure_latency(variants: dict[str, tuple[nn.Module, str]], objective: Objective, batches: list[dict],
                    device: torch.device) -> dict[str, float]:
    """Median forward (+ loss) milliseconds per variant over `batches`.

    One untimed warm-up pass each (kernel probes, caches, allocator), then the variants take
    turns on every batch in a rotating order, so background load hits them all alike.
    """
    names = list(variants)
    on_device = [_on(b, device) for b in batches]

    def forward(name: str, batch: dict) -> None:
        model, precision = variants[name]
        with autocast(precision, device):
            objective.loss(model, batch)

    for name in names:
        forward(name, on_device[0])
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, batch in enumerate(on_device):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _sync(device)
            start = time.perf_counter()
            forward(name, batch)
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def compare_variants(variants: dict[str, tuple[nn.Module, str]], objective: Objective, val_blocks: torch.Tensor,
                     batch_size: int, eval_n: int, latency_n: int, device: torch.device,
                     baseline: str = "fp32") -> dict[str, dict]:
    """Size, latency and quality of each (model, precision) variant, side by side.

    Returns {name: {size_mb, linears_mb, size_ratio, latency_ms, speedup, eval_loss, loss_delta,
    accuracy, accuracy_delta, precision, kernels}}; ratios and deltas are against `baseline`.
    """
    batches = prepare_batches(objective, val_blocks, batch_size, eval_n)
    timed = [batches[i % len(batches)] for i in range(latency_n)]  # cycles when latency_n > eval_n
    latency = measure_latency(variants, objective, timed, device)
    rows: dict[str, dict] = {}
    for name, (model, precision) in variants.items():
        loss, acc = evaluate_quality(model, objective, batches[:eval_n], device, precision)
        kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
        rows[name] = {"precision": precision, "size_mb": state_dict_bytes(model.state_dict()) / MB,
                      "linears_mb": state_dict_bytes(linear_state(model)) / MB, "latency_ms": latency[name],
                      "eval_loss": loss, "accuracy": acc, "kernels": ", ".join(kernels) or "dense"}
    base = rows[baseline]
    for row in rows.values():
        row.update(size_ratio=base["size_mb"] / row["size_mb"], linears_ratio=base["linears_mb"] / row["linears_mb"],
                   speedup=base["latency_ms"] / row["latency_ms"], loss_delta=row["eval_loss"] - base["eval_loss"],
                   accuracy_delta=row["accuracy"] - base["accuracy"])
    rows["_batches"] = {"eval": len(batches), "latency": len(timed),
                        "eval_blocks": sum(b[objective.rows_key].shape[0] for b in batches)}
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table of compare_variants' rows."""
    lines = ["| variant | size MB | size ratio | block linears MB (ratio) | latency ms | speedup "
             "| eval loss | Δ loss | accuracy | kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {r['size_mb']:.3f} | {r['size_ratio']:.2f}x | {r['linears_mb']:.3f} "
                     f"({r['linears_ratio']:.2f}x) | {r['latency_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['eval_loss']:.4f} | {r['loss_delta']:+.4f} | {r['accuracy']:.4f} | {r['kernels']} |")
    return "\n".join(lines)


def post_training_report(cfg, model, weights, val_blocks, objective, device, run_dir) -> dict:
    """Quantize the trained weights and compare them with fp32; writes model_<method>.pt and quantize.md.

    Args:
        cfg: the root config. model: the trained model, unused: every variant is rebuilt from
            `weights`, so no DDP/compile/FSDP wrapper or fake-quant layer leaks into the numbers.
        weights: the plain trained state_dict. val_blocks: validation token blocks.
        objective: the run's objective. device: where to measure. run_dir: output directory.
    Returns:
        The numbers for summary.json: per-variant rows plus the quantized-vs-fp32 headline.
    """
    q, precision = cfg.quantize, cfg.precision.dtype
    fp32 = build_float_model(cfg, weights).to(device)
    variants = {"fp32": (fp32, precision)}
    if q.method == "qat_int8":
        variants["qat_int8 (fake-quant)"] = (apply_qat(copy.deepcopy(fp32), q), precision)
    name = "qat_int8 -> dynamic_int8" if q.method == "qat_int8" else q.method
    quant = apply_ptq(copy.deepcopy(fp32), q.method, q.group_size)
    variants[name] = (quant, precision)
    eval_n = q.eval_batches if q.eval_batches is not None else cfg.trainer.eval_batches
    rows = compare_variants(variants, objective, val_blocks, cfg.trainer.batch_size, eval_n,
                            q.latency_batches, device)
    batches = rows.pop("_batches")
    path = os.path.join(run_dir, f"model_{q.method}.pt")
    torch.save({k: v.detach().cpu() for k, v in quant.state_dict().items()}, path)
    n_layers = len(_block_children(quant, (QuantLinear,)))
    header = (f"# Quantization report: {q.method}\n\n"
              f"Device {device}, {torch.get_num_threads()} CPU threads, precision {precision}; quality on "
              f"{batches['eval_blocks']} validation blocks spread over the held-out split (the eval/loss "
              f"sample), latency = median forward+loss "
              f"over {batches['latency']} batches.\nQuantized: {n_layers} Linear layers inside the transformer "
              f"blocks. Kept in full precision: {FULL_PRECISION}.\nSaved: {os.path.basename(path)} "
              f"(load with trainer.quantize.load_quantized).\n\n")
    with open(os.path.join(run_dir, "quantize.md"), "w") as f:
        f.write(header + format_table(rows) + "\n")
    print(f"quantize={q.method}: {path}\n{format_table(rows)}", file=sys.stderr)
    head = rows[name]
    return {"method": q.method, "file": path, "device": str(device), "precision": precision,
            "threads": torch.get_num_threads(), "quantized_layers": n_layers, "full_precision": FULL_PRECISION,
            "eval_batches": batches["eval"], "latency_batches": batches["latency"],
            **{k: head[k] for k in ("size_mb", "size_ratio", "linears_ratio", "latency_ms", "speedup",
                                    "eval_loss", "loss_delta", "accuracy", "accuracy_delta", "kernels")},
            "fp32": {k: rows["fp32"][k] for k in ("size_mb", "latency_ms", "eval_loss", "accuracy")},
            "variants": rows}
