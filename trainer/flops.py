"""FLOPs per token of our models (written out term by term) and the machine's measured peak.

Counting convention (PaLM / Chinchilla): a multiply-add is 2 FLOPs; training costs 3x the
forward (backward is twice the forward). Attention score and value products count causal
masking as full (the usual MFU convention, which kernels that skip blocks beat in practice).
"""
from __future__ import annotations

import json
import os
import time

import torch


def forward_flops_per_token(d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, d_ff: int,
                            seq_len: int, vocab_size: int, swiglu: bool = False, cross_len: int = 0) -> float:
    """Forward FLOPs per token of one stack of `num_layers` blocks plus the LM head."""
    dh = d_model // num_heads
    qkv = 2 * d_model * (num_heads + 2 * num_kv_heads) * dh
    out = 2 * d_model * d_model
    ffn = 2 * d_model * d_ff * (3 if swiglu else 2)
    scores = 2 * seq_len * d_model  # q . k over seq_len keys, all heads
    values = 2 * seq_len * d_model  # probs @ v
    cross = 0
    if cross_len:
        cross = 2 * d_model * d_model * 2 + 4 * cross_len * d_model  # q, out proj + scores, values
    per_layer = qkv + out + ffn + scores + values + cross
    return num_layers * per_layer + 2 * d_model * vocab_size


def train_flops_per_token(model_cfg, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs (forward + backward) per input token of `cfg.model` at `seq_len`."""
    m = model_cfg
    kw = dict(d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
              d_ff=m.d_ff, seq_len=seq_len, vocab_size=vocab_size, swiglu=m.activation == "swiglu")
    if m.arch == "encoder_decoder":  # counted per source token, decoder length ~ source length
        enc = forward_flops_per_token(num_layers=m.num_layers, **kw) - 2 * m.d_model * vocab_size
        dec = forward_flops_per_token(num_layers=m.num_decoder_layers or m.num_layers, cross_len=seq_len, **kw)
        return 3 * (enc + dec)
    return 3 * forward_flops_per_token(num_layers=m.num_layers, **kw)


def _probe(device: torch.device, dtype: torch.dtype, max_n: int, budget_s: float = 0.15) -> float:
    """Best FLOP/s of square GEMMs, growing n until one takes `budget_s` (or n hits `max_n`):
    bounded time even where a dtype has no fast kernel (bf16 on CPUs without AVX512/AMX).

    The operands come from a private generator: the probe never draws from the global RNG streams
    a training step uses, so a run's numbers do not depend on whether (or when) it probed.
    """
    n, best = 128, 0.0
    gen = torch.Generator().manual_seed(0)
    while True:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        a @ b  # warm-up (kernel selection, packing)
        dt = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = min(dt, time.perf_counter() - t0)
        best = max(best, 2 * n**3 / dt)
        if dt > budget_s or n >= max_n:
            return best
        n *= 2


_PROBED: dict[str, float] = {}  # keys probed in this process
PROBES = 5  # probes recorded per machine key before the cached best is taken without a new one


def peak_flops(device: torch.device, precision: str, cache_dir: str | None = None) -> float:
    """Peak matmul FLOP/s of this device at `precision`, measured by a GEMM probe.

    The best figure ever measured per machine, device, instruction set (ATen's CPU capability,
    which ATEN_CPU_CAPABILITY can lower), thread count and torch version is kept
    in `<cache_dir>/peak_flops.json` (default `$TRAINER_CACHE`, else ~/.cache/trainer: a run passes
    its `data.cache_dir`); each process probes once more (about half a second) and keeps the max
    until `PROBES` probes are recorded, so one probe taken while the machine was busy does not
    stick, and later processes start without the probe.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu{torch.get_num_threads()}t-{torch.backends.cpu.get_cpu_capability()}")
    key = f"{os.uname().nodename}|{name}|{precision}|torch{torch.__version__}"
    if key in _PROBED:
        return _PROBED[key]
    folder = cache_dir or os.environ.get("TRAINER_CACHE", "~/.cache/trainer")
    path = os.path.join(os.path.expanduser(folder), "peak_flops.json")
    cache = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    entry = cache.get(key)  # {"flops": best, "probes": n}; a bare number in older caches
    best, probes = ((float(entry), 1) if isinstance(entry, (int, float)) else
                    (float(entry.get("flops", 0.0)), int(entry.get("probes", 0))) if isinstance(entry, dict) else (0.0, 0))
    if probes >= PROBES and best > 0:
        _PROBED[key] = best
        return best
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    measured = _probe(device, dtype, max_n=8192 if device.type == "cuda" else 2048)
    _PROBED[key] = best = max(measured, best)
    cache[key] = {"flops": best, "probes": probes + 1}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, path)
    return best


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s, by a fragment of
# torch.cuda.get_device_name and precision; fp32 is the TF32 tensor-core rate. First match wins.
DATASHEET_PEAKS = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
)


def datasheet_peak(device: torch.device, precision: str) -> float | None:
    """The vendor's published dense peak FLOP/s of `device` at `precision` (`DATASHEET_PEAKS`), or
    None where none is listed (every CPU: their peak depends on the instruction set and clocks,
    so only the measured one is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(precision) for frag, peaks in DATASHEET_PEAKS if frag in name), None)
