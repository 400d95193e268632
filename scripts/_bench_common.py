"""Shared helpers for the benchmark scripts (bench_precision.py, bench_peers.py).

Everything that decides *what* is measured goes through the project's own code: the config is
composed by Hydra from `conf/` exactly as the CLI composes it, the model, optimizer, schedule and
GradScaler come from `models.build` / `trainer.optim` / `trainer.precision`, and a step of "our"
model is `trainer.loop.train_step` on a `trainer.loop.Loop`. This module only adds timing,
memory accounting and table printing.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:  # runnable as `python scripts/bench_x.py` without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Config, threads, device
# ----------------------------------------------------------------------------------------------


def compose_cfg(overrides: Sequence[str] = ()) -> DictConfig:
    """The real config (conf/config.yaml + the typed schema) with Hydra `overrides` applied."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config.schema import register_configs
    from trainer.config.validate import validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg


def add_common_args(p: argparse.ArgumentParser, steps: int = 10, warmup: int = 3) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where to run (auto: cuda if available)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps per configuration first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, i.e. the core count)")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="extra Hydra overrides applied on top of the preset, e.g. data.seq_len=512")
    p.add_argument("--seed", type=int, default=0)


def setup_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def get_device(kind: str) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_has_fast_bf16() -> bool | None:
    """Whether oneDNN has a native bf16 GEMM on this CPU (AVX512-BF16/AMX class); None if unknown.

    Without it torch falls back to a generic bf16 GEMM that is many times slower than fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_has_fast_fp16() -> bool | None:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return None


# /proc/cpuinfo flags that decide which GEMM kernels oneDNN can use (fp32, bf16, int8).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(CPU model name, the `CPU_FLAGS` it has) from /proc/cpuinfo; (machine, []) where unreadable."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, [f for f in CPU_FLAGS if f in flags]


def environment(device: torch.device) -> str:
    """One line describing the machine and the torch build (printed above every table)."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu, flags = cpu_model_and_flags()
        missing = [f for f in ("avx512_bf16", "amx_tile") if f not in flags]
        where = (f"{cpu}, {torch.get_num_threads()} threads, flags: {' '.join(flags) or '-'}"
                 f"{' (no ' + ', no '.join(missing) + ')' if missing else ''}, "
                 f"ISA {torch.backends.cpu.get_cpu_capability()}, "
                 f"native bf16 GEMM: {cpu_has_fast_bf16()}, native fp16 GEMM: {cpu_has_fast_fp16()}")
    return f"torch {torch.__version__} | {where} | python {platform.python_version()}"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def random_blocks(n: int, seq_len: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """(n, seq_len + 1) random byte tokens: the packed-block layout the batch stream serves."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len + 1), generator=g, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Our model through the training loop
# ----------------------------------------------------------------------------------------------


def build_loop(cfg: DictConfig, device: torch.device, blocks: torch.Tensor, *, vocab_size: int | None = None,
               optimizer_factory: Callable | None = None):
    """A `trainer.loop.Loop` assembled in `trainer.run`'s build order (model -> QAT -> device ->
    compile -> optimizer, schedule, scaler), over an in-memory `BatchStream` of `blocks`.

    `optimizer_factory(model, cfg.optim, device)` replaces `build_optimizer` (experiments only).
    Returns (loop, n_params).
    """
    from trainer.objectives import resolve_objective
    from trainer.data import VOCAB_SIZE, BatchStream
    from trainer.distributed import Dist
    from trainer.loop import Loop
    from trainer.objectives import build_objective
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.precision import build_scaler
    from trainer.run import build_wrapped_model

    torch.manual_seed(cfg.seed)
    model, n_params = build_wrapped_model(cfg, device, Dist(), vocab_size=vocab_size or VOCAB_SIZE)
    optimizer = (optimizer_factory or build_optimizer)(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps)
    scaler = build_scaler(cfg.precision.dtype, device, cfg.precision.init_scale)
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective)
    model.train()
    lp = Loop(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, objective=objective,
              stream=BatchStream(blocks, cfg.trainer.batch_size, cfg.seed), evaluators=[],
              gen=torch.Generator().manual_seed(cfg.seed), device=device, precision=cfg.precision.dtype,
              dist=Dist(), logger=None, cfg=cfg.trainer, mfu=lambda tps: 0.0,
              save=lambda step: None, stop_signal=lambda: 0)
    return lp, n_params


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`, device work included.

    CPU seconds add up every thread of this process: on a machine shared with other work, wall
    time grows with the contention while CPU time stays closer to the work done (OpenMP threads
    spin-waiting at barriers still count).
    """
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def round_robin(cases: dict[str, Callable[[], object]], device: torch.device, steps: int, warmup: int,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every case up, then time them interleaved (case A, B, C, A, B, C, ...) so that machine
    noise (other processes, frequency changes) lands on all of them alike.

    Returns (wall seconds per call, process CPU seconds per call), each keyed by case.
    """
    for name, fn in cases.items():
        for i in range(warmup):
            t, _ = timed(fn, device)
            if log:
                log(f"  warm-up {name} {i + 1}/{warmup}: {t:.3f}s")
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(steps):
        for name, fn in cases.items():
            w, c = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
        if log:
            log(f"  repeat {r + 1}/{steps}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in wall.items()))
    return wall, cpu


def load_average() -> str:
    """The 1-minute load average against the core count (other work competing for the CPUs)."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


def summarize(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "iqr": q[2] - q[0]}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held between steps: parameters, buffers and optimizer state (grads are set to None)."""
    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes([*model.parameters(), *model.buffers(), *opt])


def step_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Memory of one call of `fn` beyond what was allocated when it started.

    CUDA: the caching allocator's peak (`max_memory_allocated`) minus the bytes allocated at entry.
    CPU: every allocation and free of PyTorch's CPU allocator during the call, recorded by
    `torch.profiler` (profile_memory=True) and replayed in time order; the peak of the running sum
    is the step's extra memory (activations, gradients, temporaries). Memory that oneDNN/MKL
    allocate privately (small GEMM scratch) is not seen.
    Returns {"extra": bytes, "net": bytes still held after the call}.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return {"extra": torch.cuda.max_memory_allocated(device) - base,
                "net": torch.cuda.memory_allocated(device) - base}
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return {"extra": float(peak), "net": float(running)}


class _quiet_stderr:
    """Silence the profiler's C++ start/stop lines on fd 2 for the duration of a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.devnull, 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.devnull)
        return False


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise", "aten::mkldnn_linear")


def profile_ops(fn: Callable[[], object], device: torch.device, row_limit: int = 25) -> tuple[str, dict[str, float]]:
    """Profile one call of `fn`: (table of the top ops by self time, {op name: self seconds})."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=acts) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    self_s = {e.key: getattr(e, attr, getattr(e, key, 0.0)) / 1e6 for e in averages}
    return averages.table(sort_by=key, row_limit=row_limit), self_s


# Where a step's self time goes, by op name (first matching rule wins). bmm/baddbmm are the
# attention score/value products in every model benchmarked here (the projections are mm/addmm).
TIME_CATEGORIES = (
    ("GEMM (projections, head)", ("aten::mm", "aten::addmm", "aten::_addmm_activation", "mkldnn::_linear_pointwise",
                                  "aten::mkldnn_linear")),
    ("attention", ("scaled_dot_product", "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax",
                   "_softmax_backward_data")),
    ("norms", ("layer_norm", "rms_norm")),
    ("casts and copies", ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
    ("optimizer and grad clip", ("adamw", "aten::_foreach", "aten::linalg_vector_norm", "Optimizer.",
                                 "aten::zero_", "aten::mul_", "aten::add_")),
    ("loss and embedding", ("log_softmax", "nll_loss", "cross_entropy", "embedding", "aten::index_select")),
    ("compiled (fused elementwise + norms)", ("CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction")),
)


def time_breakdown(self_s: dict[str, float]) -> dict[str, float]:
    """Seconds of a profiled step per `TIME_CATEGORIES` entry, the rest as "elementwise and other"."""
    out = {name: 0.0 for name, _ in TIME_CATEGORIES}
    out["elementwise and other"] = 0.0
    for op, sec in self_s.items():
        name = next((n for n, keys in TIME_CATEGORIES if any(k in op for k in keys)), "elementwise and other")
        out[name] += sec
    return out


def gemm_summary(self_s: dict[str, float], gemm_flops: float, peak: float | None) -> str:
    """Where a profiled step's time went relative to its GEMMs (the projections and the head)."""
    total = sum(self_s.values())
    gemm = sum(v for k, v in self_s.items() if k in GEMM_OPS)
    attn = sum(v for k, v in self_s.items() if "scaled_dot_product" in k)
    line = (f"self time {total:.3f}s: GEMM ops {gemm:.3f}s ({100 * gemm / max(total, 1e-12):.0f}%, "
            f"{gemm_flops / 1e9:.1f} GFLOP -> {gemm_flops / max(gemm, 1e-12) / 1e9:.1f} GFLOP/s achieved), "
            f"SDPA kernels {attn:.3f}s ({100 * attn / max(total, 1e-12):.0f}%), "
            f"everything else {total - gemm - attn:.3f}s ({100 * (total - gemm - attn) / max(total, 1e-12):.0f}%)")
    if peak:
        line += f"; GEMM floor at the probe peak {peak / 1e9:.1f} GFLOP/s: {gemm_flops / peak:.3f}s"
    return line


def peak(device: torch.device, precision: str, fresh: bool = False, repeats: int = 3) -> float:
    """trainer.flops.peak_flops: the cached GEMM probe, or (fresh=True) the best of `repeats` new
    probes, each into a throw-away cache, for when the cached value was measured while other work
    loaded the machine (a probe is a handful of single GEMMs, so one busy moment lowers it)."""
    from trainer.flops import peak_flops

    if not fresh:
        return peak_flops(device, precision)
    import tempfile

    old = os.environ.get("TRAINER_CACHE")
    best = 0.0
    try:
        for _ in range(max(1, repeats)):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["TRAINER_CACHE"] = tmp
                best = max(best, peak_flops(device, precision))
    finally:
        if old is None:
            os.environ.pop("TRAINER_CACHE", None)
        else:
            os.environ["TRAINER_CACHE"] = old
    return best


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
