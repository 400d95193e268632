"""Side-by-side measurement of model variants: serialized size, latency (eager and compiled) and
held-out quality, and the markdown table of quantize.md."""
from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from trainer.data.heldout import eval_sample
from trainer.data.heldout import EVAL_SEED  # same masks as the logged eval/loss
from trainer.objectives import Objective
from trainer.precision import autocast

MB = 1e6
COMPILE_MODES = {"false": (False,), "true": (True,), "both": (False, True)}
# torchao's recommended inductor settings for quantized models, applied only while compiling and
# timing (its configs would otherwise set them process-wide and never undo them).
INDUCTOR = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
            "force_fuse_int_mm_with_mul": True, "fx_graph_cache": True}


def cpu_features() -> dict[str, bool]:
    """Which of AVX2 / AVX512 / AVX512-VNNI / AMX this CPU has, as torch sees them."""
    cap = torch.backends.cpu.get_cpu_capability()

    def probe(name: str) -> bool:
        for where in (getattr(torch._C, "_cpu", None), torch.cpu):
            if hasattr(where, name):
                return bool(getattr(where, name)())
        return False

    return {"AVX2": cap in ("AVX2", "AVX512"), "AVX512": cap == "AVX512",
            "AVX512-VNNI": probe("_is_vnni_supported"), "AMX": probe("_is_amx_tile_supported")}


def cpu_flags() -> str:
    """e.g. "AVX2, AVX512, AVX512-VNNI, no AMX"."""
    return ", ".join(k if v else f"no {k}" for k, v in cpu_features().items())


def tensor_bytes(t: torch.Tensor) -> int:
    """Data bytes of `t`; for a tensor subclass (torchao), the sum over its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_dict_bytes(state: dict) -> int:
    """Bytes of `state` serialized with torch.save (what a checkpoint file would take)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


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

    Untimed warm-up on every distinct batch shape (compilation, caches, allocator), then the
    variants take turns on every batch in a rotating order, so background load hits them all alike.
    """
    names = list(variants)
    on_device = [_on(b, device) for b in batches]

    def forward(name: str, batch: dict) -> None:
        model, precision = variants[name]
        with autocast(precision, device):
            objective.loss(model, batch)

    shapes = {tuple(v.shape for v in b.values()): b for b in on_device}
    for name in names:
        for batch in shapes.values():
            forward(name, batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, batch in enumerate(on_device):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _sync(device)
            start = time.perf_counter()
            forward(name, batch)
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def compare_variants(variants: dict[str, tuple], objective: Objective, val_blocks: torch.Tensor,
                     batch_size: int, eval_n: int, latency_n: int, device: torch.device,
                     baseline: str = "fp32", compile: str = "false") -> dict[str, dict]:
    """Size, latency and quality of each variant, side by side.

    Args:
        variants: {name: (model, precision) or (model, precision, info)}; info holds the report's
            library/config/kernel/compiled_kernel/fallback columns, and compile=False to skip
            the variant's compiled row.
        compile: "false" eager rows, "true" only "<name> + compile" rows, "both" both.
    Returns {name: {size_mb, linears_mb, latency_ms, eval_loss, accuracy, precision, library,
    config, kernel, fallback, compiled, and ratios/deltas against `baseline`
    (size_ratio, linears_ratio, speedup, loss_delta, accuracy_delta)}}, plus "_batches". Quality
    is measured eagerly; a compiled row repeats its eager row's quality.
    """
    from trainer.quantize import linear_state  # layer selection lives with the transforms

    modes = COMPILE_MODES[compile]
    batches = prepare_batches(objective, val_blocks, batch_size, eval_n)
    timed = [batches[i % len(batches)] for i in range(latency_n)]  # cycles when latency_n > eval_n
    rows: dict[str, dict] = {}
    timing: dict[str, tuple[nn.Module, str]] = {}
    for name, (model, precision, *rest) in variants.items():
        info = {"library": "torch", "config": "-", "kernel": "dense matmul", "fallback": "",
                **(rest[0] if rest else {})}
        loss, acc = evaluate_quality(model, objective, batches[:eval_n], device, precision)
        base = {"precision": precision, "size_mb": state_dict_bytes(model.state_dict()) / MB,
                "linears_mb": state_dict_bytes(linear_state(model)) / MB, "eval_loss": loss, "accuracy": acc,
                **{k: info[k] for k in ("library", "config", "kernel", "fallback")}}
        for compiled in modes if info.get("compile", True) else (False,):
            row_name = f"{name} + compile" if compiled else name
            kernel = info.get("compiled_kernel", f"torch.compile (inductor) of: {info['kernel']}")
            rows[row_name] = {**base, "compiled": compiled, **({"kernel": kernel} if compiled else {})}
            timing[row_name] = (torch.compile(model) if compiled else model, precision)
    patch = contextlib.nullcontext()
    if True in modes:
        from torch._inductor import config as inductor_config  # heavy (pulls dynamo): only when compiling

        patch = inductor_config.patch(INDUCTOR)
    try:
        with patch:
            latency = measure_latency(timing, objective, timed, device)
    finally:
        if True in modes:
            torch._dynamo.reset()  # no compiled graphs outlive the report (a multirun shares the process)
    base_name = baseline if baseline in rows else f"{baseline} + compile"
    for name, row in rows.items():
        row["latency_ms"] = latency[name]
    ref = rows[base_name]
    for row in rows.values():
        row.update(size_ratio=ref["size_mb"] / row["size_mb"], linears_ratio=ref["linears_mb"] / row["linears_mb"],
                   speedup=ref["latency_ms"] / row["latency_ms"], loss_delta=row["eval_loss"] - ref["eval_loss"],
                   accuracy_delta=row["accuracy"] - ref["accuracy"])
    rows["_batches"] = {"eval": len(batches), "latency": len(timed), "baseline": base_name,
                        "eval_blocks": sum(b[objective.rows_key].shape[0] for b in batches)}
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table of compare_variants' rows."""
    lines = ["| variant | library | config | kernel | size MB | block linears MB (ratio) | latency ms | speedup "
             "| eval loss | Δ loss | accuracy |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {r['library']} | {r['config']} | {r['kernel']} | {r['size_mb']:.3f} | "
                     f"{r['linears_mb']:.3f} ({r['linears_ratio']:.2f}x) | {r['latency_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['eval_loss']:.4f} | {r['loss_delta']:+.4f} | {r['accuracy']:.4f} |")
    return "\n".join(lines)


# Third-party warnings the report triggers in an ordinary run, silenced by message and category:
# torch's AOT-autograd cache on torchao's int8 tensor subclasses under quantize.compile (nothing a
# user can act on; the compiled latency rows are still measured).
QUIET = ((UserWarning, r".*does not implement _stable_hash_for_caching"),)


@contextlib.contextmanager
def quiet_report_warnings() -> Iterator[None]:
    """Ignore the `QUIET` warnings (by category and message) inside; every other warning still shows."""
    with warnings.catch_warnings():
        for category, message in QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
