"""The longest document each attention kernel embeds within a memory budget, measured.

For each `attention=standard|flash|tiled`, the run's encoder (same sizes, position scheme and
norm; fresh weights, which do not change memory) embeds one document of length L = `start`,
2 x start, 4 x start, ... without gradients, and the extra memory of that forward is measured: on
CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated before;
on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set
before. The longest L whose forward stays within `budget_mb` is reported per kernel. `standard`
materialises the (H, L, L) score matrix, so its memory grows with L^2; `flash` (PyTorch's
scaled_dot_product_attention kernels) and `tiled` (online softmax over key blocks, Milakov &
Gimelshein 2018 / FlashAttention, Dao et al. 2022) keep it at O(L).
"""
from __future__ import annotations

import copy
import os
import sys

import torch

from trainer.metrics import peak_memory_mb, reset_peak_memory
from models.build import build_model
from trainer.config.schema import Config

KINDS = ("standard", "flash", "tiled")

def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

def _malloc_to_system() -> None:
    """glibc: serve every allocation >= 128 KiB with its own mapping, returned on free (no dynamic
    threshold), and give back what the heap holds now. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass

@torch.no_grad()
def forward_memory_mb(model: torch.nn.Module, length: int, device: torch.device) -> float:
    """Extra MiB one no-grad encoder forward of a (1, length) document takes (see the module doc)."""
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        _malloc_to_system()
        before = _rss_mb()
    reset_peak_memory(device)
    model(tokens, head=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(peak_memory_mb(device) - before, 0.0)

def longest_documents(cfg, budget_mb: float, start: int, max_length: int, device: torch.device,
                      kinds: tuple[str, ...] = KINDS) -> dict[str, dict]:
    """See `_longest_documents`. On CPU the measurement runs in a fresh child process: a process that
    has trained holds freed heap memory its allocator reuses without the resident set growing, so
    its own peak would understate a forward's memory. The child has glibc return every allocation
    of 128 KiB or more to the system when freed (M_MMAP_THRESHOLD fixed), so each forward's peak
    resident set above the level before is what that forward allocated."""
    if device.type == "cuda":
        return _longest_documents(cfg, budget_mb, start, max_length, device, kinds)
    import json
    import subprocess
    import sys
    import tempfile

    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        OmegaConf.save(cfg, path, resolve=True)
        args = [sys.executable, "-m", "trainer.quantize.long_context", path, str(budget_mb), str(start),
                str(max_length), ",".join(kinds), str(torch.get_num_threads())]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))))
    if proc.returncode != 0:
        raise RuntimeError(f"the long-document measurement failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: {"max_length": v["max_length"], "memory_mb": {int(n): mb for n, mb in v["memory_mb"].items()}}
            for k, v in out.items()}

def _longest_documents(cfg, budget_mb: float, start: int, max_length: int, device: torch.device,
                       kinds: tuple[str, ...] = KINDS) -> dict[str, dict]:
    """{kind: {"max_length": longest L within `budget_mb` (0 if even `start` is over), "memory_mb":
    {L: MiB measured}}} for each attention kind, on root config `cfg`'s encoder.

    Lengths double from `start` up to `max_length`; a kind stops at its first length over budget.
    position=learned cannot go past its table, so its lengths stop at data.seq_len.
    """

    limit = cfg.data.seq_len if cfg.position.kind == "learned" else max_length
    out = {}
    for kind in kinds:
        attention = copy.deepcopy(cfg.attention)
        attention.kind = kind
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.model, attention, cfg.position, cfg.norm, vocab_size=384,
                                max_len=max(limit, cfg.data.seq_len)).to(device).eval()
        measured, best, length = {}, 0, start
        while length <= limit:
            mb = forward_memory_mb(model, length, device)
            measured[length] = mb
            if mb > budget_mb:
                break
            best, length = length, length * 2
        out[kind] = {"max_length": best, "memory_mb": measured}
        del model
    return out

def format_long_context(rows: dict[str, dict], budget_mb: float) -> str:
    """A markdown table: per kernel, the longest length within the budget and the memory measured."""
    lengths = sorted({n for r in rows.values() for n in r["memory_mb"]})
    lines = [f"| attention | longest within {budget_mb:g} MiB | vs standard | "
             + " | ".join(f"MiB @ {n}" for n in lengths) + " |",
             "|---|---:|---:|" + "---:|" * len(lengths)]
    base = rows.get("standard", {}).get("max_length", 0)
    for kind, r in rows.items():
        ratio = f"{r['max_length'] / base:.0f}x" if base else "-"
        cells = " | ".join(f"{r['memory_mb'][n]:.0f}" if n in r["memory_mb"] else "-" for n in lengths)
        lines.append(f"| {kind} | {r['max_length']} | {ratio} | {cells} |")
    return "\n".join(lines)

if __name__ == "__main__":  # the child process of `longest_documents` on CPU
    import json

    from omegaconf import OmegaConf

    _malloc_to_system()
    cfg_path, budget, first, last, names, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    run_cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(cfg_path))
    result = _longest_documents(run_cfg, float(budget), int(first), int(last), torch.device("cpu"),
                                tuple(names.split(",")))
    print(json.dumps(result))
