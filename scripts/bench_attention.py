"""Benchmark the attention kernels side by side: fwd+bwd time and peak memory.

Usage:
    python scripts/bench_attention.py [--device cpu|cuda] [--lengths 256 1024 4096 8192]
        [--dtypes fp32 bf16] [--out-dir docs/benchmarks] [--tiled-blocks 64 128 256] [--no-causal]
    python scripts/bench_attention.py --lengths 256 512 1024 --batch 8 --heads 6 --threads 2 \
        --kernels flash flash-sdpa   # where flash's CPU matmul-softmax path beats SDPA's kernel

Every configuration is causal (or with --no-causal, unmasked) self-attention with B=1, H=8,
Dh=64 (overridable)
and runs ``attention(q, k, v, kernel=...)`` followed by ``out.backward(grad)``
with all inputs allocated beforehand, so only the attention op is measured.

Time: after ``--warmup`` untimed calls per kernel, ``--repeats`` rounds are run
in which every kernel is called once (interleaved, so background load affects
all kernels alike); the median round time is reported.

Peak attention memory (bytes allocated during fwd+bwd, above what was live
before the call; includes the output, the q/k/v gradients and every
intermediate, excludes the inputs and the upstream gradient):
    cuda: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()``
        before the call, after ``reset_peak_memory_stats()``.
    cpu: one extra call under ``torch.profiler`` with ``profile_memory=True``;
        its allocation/free events are replayed in time order and the peak of
        the running total is taken (exact for tensors from the CPU allocator;
        it is not process RSS).

A combination whose estimated memory exceeds ``--max-mem-mib`` is reported as
"skipped" (the standard kernel holds several (B, H, T, T) fp32 buffers).

Outputs: a markdown table on stdout and in <out-dir>/attention_<hardware>_<date>.md (the
command and the machine above it; scripts/_report.py), and a plot of time and memory against T
beside it, <out-dir>/attention_<hardware>_<date>.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

import _report  # noqa: E402
import models.ops.attention as attention_mod  # noqa: E402
from models.ops.attention import KERNELS, attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2 ** 20
# flash-sdpa: attention=flash with its CPU matmul-softmax path for short sequences switched off,
# so SDPA's fused kernel runs at every length (the comparison behind MATMUL_SOFTMAX_MAX_SCORES).
BENCH_KERNELS = list(KERNELS) + ["flash-sdpa"]


@dataclass
class Result:
    """One table row; ``ms``/``mib`` are None when the combination was skipped."""

    t: int
    dtype: str
    kernel: str
    ms: float | None
    mib: float | None


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--kernels", nargs="+", choices=BENCH_KERNELS, default=list(KERNELS))
    p.add_argument("--tiled-blocks", type=int, nargs="+", default=[128],
                   help="block sizes for the tiled kernel; each becomes its own row")
    p.add_argument("--no-causal", dest="causal", action="store_false",
                   help="unmasked (encoder) attention instead of causal")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-mem-mib", type=float, default=6144.0,
                   help="skip combinations whose estimated attention memory exceeds this")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is steadier "
                        "on a shared CPU")
    p.add_argument("--out-dir", type=Path, default=_report.RESULTS_DIR,
                   help="where the dated result file and its plot go (default: docs/benchmarks)")
    return p.parse_args()


def estimate_mib(kernel: str, b: int, h: int, t: int, dh: int) -> float:
    """Pessimistic memory estimate used only to decide what to skip."""
    linear = 16 * b * h * t * dh * 4  # outputs, grads and fp32 copies
    if kernel == "standard":
        return (6 * b * h * t * t * 4 + linear) / MIB  # scores, probs and their grads
    return (linear + 4 * b * h * 256 * max(t, 256) * 4) / MIB


def make_step(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              grad: torch.Tensor, causal: bool = True) -> Callable[[], None]:
    """A closure running one forward+backward of kernel ``name`` ("tiled@128" style)."""
    kernel, _, block = name.partition("@")
    block_size = int(block) if block else 128
    sdpa_only = kernel == "flash-sdpa"
    kernel = "flash" if sdpa_only else kernel

    def step() -> None:
        limits = attention_mod.MATMUL_SOFTMAX_MAX_SCORES
        attention_mod.MATMUL_SOFTMAX_MAX_SCORES = {} if sdpa_only else limits
        try:
            out = attention(q, k, v, kernel=kernel, causal=causal, block_size=block_size)
            out.backward(grad)
        finally:
            attention_mod.MATMUL_SOFTMAX_MAX_SCORES = limits
        del out
        for x in (q, k, v):  # free inside the step so every call starts from the same state
            x.grad = None

    return step


def sync(device: str) -> None:
    """Wait for queued device work so wall-clock timing is honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib_cuda(step: Callable[[], None]) -> float:
    """Peak CUDA bytes allocated by ``step`` above the bytes live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def peak_mib_cpu(step: Callable[[], None]) -> float:
    """Peak of the running allocated-minus-freed total recorded by the profiler."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak / MIB


def bench_config(args: argparse.Namespace, t: int, dtype_name: str,
                 names: list[str]) -> list[Result]:
    """Time and measure every kernel for one (T, dtype), interleaving the repeats."""
    b, h, dh, dev = args.batch, args.heads, args.head_dim, args.device
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, grad = (torch.randn(b, h, t, dh, generator=g, device=dev, dtype=dtype)
                     for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    run = [n for n in names if estimate_mib(n.split("@")[0], b, h, t, dh) <= args.max_mem_mib]
    steps = {n: make_step(n, q, k, v, grad, args.causal) for n in run}
    for n in run:
        for _ in range(args.warmup):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in run}
    for _ in range(args.repeats):
        for n in run:
            sync(dev)
            start = time.perf_counter()
            steps[n]()
            sync(dev)
            times[n].append((time.perf_counter() - start) * 1e3)
    measure = peak_mib_cuda if dev == "cuda" else peak_mib_cpu
    results = []
    for n in names:
        if n in steps:
            results.append(Result(t, dtype_name, n, statistics.median(times[n]), measure(steps[n])))
        else:
            results.append(Result(t, dtype_name, n, None, None))
        r = results[-1]
        print(f"T={t} {dtype_name} {n}: " + ("skipped" if r.ms is None
              else f"{r.ms:.1f} ms, {r.mib:.1f} MiB"), flush=True)
    return results


def ratio(x: float | None, ref: float | None) -> str:
    """``x / ref`` formatted, or n/a when either side is missing."""
    return "n/a" if x is None or ref is None or ref == 0 else f"{x / ref:.2f}x"


def to_markdown(results: list[Result], header: str) -> str:
    """Markdown table with time and memory ratios against the standard kernel."""
    ref = {(r.t, r.dtype): r for r in results if r.kernel == "standard"}
    lines = [header, "",
             "| T | dtype | kernel | fwd+bwd ms | peak attention MiB | time vs standard "
             "| memory vs standard |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        s = ref.get((r.t, r.dtype))
        ms = "skipped" if r.ms is None else f"{r.ms:.1f}"
        mib = "skipped" if r.mib is None else f"{r.mib:.1f}"
        lines.append(f"| {r.t} | {r.dtype} | {r.kernel} | {ms} | {mib} | "
                     f"{ratio(r.ms, s and s.ms)} | {ratio(r.mib, s and s.mib)} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, title: str) -> None:
    """Time and memory against T, one line per (kernel, dtype), log-log axes."""
    import matplotlib

    matplotlib.use("Agg")  # headless: only writes a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = sorted({(r.kernel, r.dtype) for r in results})
    for kernel, dtype in series:
        rows = [r for r in results if (r.kernel, r.dtype) == (kernel, dtype) and r.ms is not None]
        if not rows:
            continue
        ts = [r.t for r in rows]
        style = "-" if dtype == "fp32" else "--"
        axes[0].plot(ts, [r.ms for r in rows], style, marker="o", label=f"{kernel} {dtype}")
        axes[1].plot(ts, [r.mib for r in rows], style, marker="o", label=f"{kernel} {dtype}")
    for ax, ylabel in zip(axes, ["fwd+bwd time (ms)", "peak attention memory (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run every (T, dtype, kernel) combination and write the table and plot."""
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    names = [n for n in args.kernels if n != "tiled"]
    if "tiled" in args.kernels:
        names += [f"tiled@{bs}" for bs in args.tiled_blocks]
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    header = (f"{'Causal' if args.causal else 'Unmasked'} attention fwd+bwd, B={args.batch}, H={args.heads}, Dh={args.head_dim}, "
              f"torch {torch.__version__}, {where}; median of {args.repeats} after "
              f"{args.warmup} warm-up; tiled@N = tiled kernel with block_size N.")
    results: list[Result] = []
    for t in args.lengths:
        for dtype_name in args.dtypes:
            results += bench_config(args, t, dtype_name, names)
    table = to_markdown(results, header)
    print()
    print(table)
    path = _report.write_result("attention", table, device=args.device, out_dir=args.out_dir)
    plot(results, path.with_suffix(".png"), f"attention kernels ({_report.hardware_name(args.device)})")
    with path.open("a") as f:  # the plot beside the table, named like it
        f.write(f"\n![fwd+bwd time and peak memory against T]({path.with_suffix('.png').name})\n")


if __name__ == "__main__":
    main()
