"""Where a benchmark's result goes: one dated markdown file per run under docs/benchmarks/.

Every script in scripts/ ends with `write_result(topic, markdown)`, which writes
`docs/benchmarks/<topic>_<hardware>_<date>.md` (torchtitan's habit: results as dated files,
never edited afterwards) holding the command that produced it, the machine it ran on and the
script's markdown. `<hardware>` names the machine by what decides the numbers: a GPU by its model
(`h100`), a CPU by its vendor and family plus its best matrix-multiply instruction set
(`intel-xeon-amx`, `amd-epyc-avx512bf16`, `amd-epyc-avx2`), so results from different machines
never share a name. A second run of the same topic on the same machine and day gets `_2`, `_3`, ...:
nothing already written is overwritten.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from _bench_common import ROOT, cpu_model_and_flags, load_average

RESULTS_DIR = ROOT / "docs" / "benchmarks"
# CPU vendors whose name is followed by the family word (AMD EPYC, Intel Xeon, Intel Core, ...).
_VENDORS = ("amd", "intel", "ampere", "apple", "arm")
# Words of a GPU's name that describe its memory or packaging rather than the chip.
_GPU_NOISE = re.compile(r"^(nvidia|tesla|\d+gb|hbm\d*e?|pcie|sxm\d*|nvl|mig.*)$")


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _slug(words: list[str]) -> str:
    return re.sub(r"-+", "-", "-".join(re.sub(r"[^a-z0-9]+", "-", w.lower()) for w in words)).strip("-")


def cpu_isa_tag(flags: list[str]) -> str:
    """The best matrix-multiply instruction set among /proc/cpuinfo `flags`: what sets a CPU's
    bf16/int8 GEMM speed ("amx", "avx512bf16", "avx512", "avx2", or "" when none is known)."""
    for flag, tag in (("amx_tile", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return tag
    return ""


def hardware_name(device: torch.device | str | None = None) -> str:
    """A file-name-safe name of the machine a benchmark ran on.

    Args:
        device: the device measured; a CUDA device is named by `torch.cuda.get_device_name`
            ("NVIDIA H100 80GB HBM3" -> "h100"), anything else by the CPU in /proc/cpuinfo
            ("AMD EPYC 9B14" with avx512_bf16 -> "amd-epyc-avx512bf16", "Intel(R) Xeon(R)
            Platinum 8481C" with amx_tile -> "intel-xeon-amx").
    Returns:
        Lowercase letters, digits and dashes; the machine architecture (e.g. "aarch64") where
        /proc/cpuinfo names no model.
    """
    if _is_cuda(device):
        words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(torch.device(device)).lower())
        return _slug([w for w in words if w and not _GPU_NOISE.match(w)]) or "cuda"
    model, flags = cpu_model_and_flags()
    words = re.sub(r"\((r|tm)\)", " ", model.lower()).split()
    start = next((i for i, w in enumerate(words) if w in _VENDORS), 0)
    family = _slug(words[start:start + 2]) or _slug([platform.machine()])
    return "-".join(p for p in (family, cpu_isa_tag(flags)) if p)


def machine_description(device: torch.device | str | None = None) -> str:
    """One markdown line: the device (GPU name, or CPU model, logical CPUs, the GEMM-relevant
    flags it has and lacks), torch's version and threads, and the load average while measuring."""
    if _is_cuda(device):
        where = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        model, flags = cpu_model_and_flags()
        missing = [f for f in ("avx512_bf16", "amx_tile") if f not in flags]
        where = (f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(flags) or '-'}"
                 + (f" (no {', no '.join(missing)})" if missing else ""))
    return (f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{load_average()} when written")


def invocation() -> str:
    """The command line that started this process, as a user would type it from the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def result_path(topic: str, hardware: str, date: datetime.date | None = None,
                out_dir: Path | str | None = None) -> Path:
    """`<out_dir>/<topic>_<hardware>_<date>.md`, with `_2`, `_3`, ... appended while that exists."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    stem = f"{topic}_{hardware}_{(date or datetime.date.today()).isoformat()}"
    path, n = out / f"{stem}.md", 1
    while path.exists():
        n += 1
        path = out / f"{stem}_{n}.md"
    return path


class Markdown:
    """Markdown lines printed as they are produced (a long benchmark shows its rows as they come)
    and kept, so the same text can go to `write_result` at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        """Print `text` (flushed) and keep it as the next line(s) of the result."""
        print(text, flush=True)
        self.lines.append(text)

    def text(self) -> str:
        """Everything printed so far, one string."""
        return "\n".join(self.lines)


def write_result(topic: str, markdown: str, command: str | None = None,
                 device: torch.device | str | None = None, out_dir: Path | str | None = None) -> Path:
    """Write one benchmark result as `docs/benchmarks/<topic>_<hardware>_<date>.md`.

    Args:
        topic: what was measured, one word ("attention", "precision", "peers", ...).
        markdown: the script's tables and notes.
        command: the command that produced them (default: this process's command line).
        device: the device measured (names the hardware; default: the CPU).
        out_dir: the folder (default docs/benchmarks/ of this checkout; created if missing).
    Returns:
        The path written (never an existing file: see `result_path`).
    """
    today = datetime.date.today()
    path = result_path(topic, hardware_name(device), today, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {topic}: {hardware_name(device)}, {today.isoformat()}\n\n"
            f"Command:\n\n```bash\n{command or invocation()}\n```\n\n"
            f"Machine: {machine_description(device)}.\n\n{markdown.strip()}\n")
    path.write_text(text)
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    return path
