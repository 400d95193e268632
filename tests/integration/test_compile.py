"""trainer.compile=true: each transformer block compiled (regional), the same losses as eager,
exact resume, DDP, and no compiled graph left behind for the next run of the process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, tiny_cli_args
from tb import read_scalars
from trainer.run import run

COMMON = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.eval_every=3", "model.dropout=0.0"]
# Inductor fuses and reorders the blocks' elementwise and reduction ops, so sums round
# differently from eager's. Bounds from the numerics, for a loss of ~5.5 averaged over B x T = 256
# targets: fp32 reorders sums (eps 1.2e-7) over reductions of <= 256 terms, 1.2e-7 x sqrt(256) x 5.5
# = 1e-5 per step, ~2.6e-5 after 6 steps adding in quadrature: 5e-5. bf16: a fused kernel keeps
# intermediates in fp32 where eager rounds each op's output to bf16 (half an ulp, 3.9e-3 relative),
# independent per target and averaged over 256: 3.9e-3 x 5.5 / sqrt(256) = 1.3e-3: 2e-3.
# (Measured on an AVX512 CPU: fp32 <= 5e-7, bf16 <= 4e-5.)
TOL = {"fp32": 5e-5, "bf16": 2e-3}


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m trainer ARGS` (as tests/distributed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _block_cache_entries() -> int:
    """How many compiled graphs dynamo holds for `Block.forward` in this process."""
    from models.blocks import Block

    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(Block.forward.__code__))


@pytest.fixture
def compiled_models(monkeypatch):
    """Every model `trainer.transforms.apply_compile` returns during the test."""
    import trainer.transforms as run_mod

    seen = []
    real = run_mod.apply_compile

    def spy(model, enabled):
        out = real(model, enabled)
        seen.append((out, enabled, _block_cache_entries()))
        return out

    monkeypatch.setattr(run_mod, "apply_compile", spy)
    return seen


# The encoder_decoder case compiles encoder blocks (bidirectional, padding-free) and decoder blocks
# with cross-attention, so it covers model=encoder's blocks too.
@pytest.mark.parametrize("extra,precision", [(["model=decoder"], "fp32"),
                                             (["model=encoder_decoder", "position=relative"], "fp32"),
                                             (["model=decoder"], "bf16")])
def test_compiled_run_gives_the_eager_losses(make_cfg, tmp_path, compiled_models, extra, precision):
    args = [*COMMON, *extra, f"precision={precision}"]
    eager = run(make_cfg(*args), run_dir=str(tmp_path / "eager"))
    compiled = run(make_cfg(*args, "trainer.compile=true"), run_dir=str(tmp_path / "compiled"))
    model, enabled, _ = compiled_models[-1]
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    assert enabled and blocks and all(b._compiled_call_impl is not None for b in blocks)
    # Regional: the blocks and nothing else (no whole-model graph, no stack or embedding compiled).
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules() if m not in blocks)
    assert compiled["components"]["compile"] is True
    a, b = read_scalars(str(tmp_path / "eager")), read_scalars(str(tmp_path / "compiled"))
    for step in range(1, 7):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=TOL[precision]), step
    assert compiled["eval/loss"] == pytest.approx(eager["eval/loss"], abs=TOL[precision])
    # Checkpoints and final weights keep the plain parameter names (no compile wrapper prefix).
    weights = torch.load(tmp_path / "compiled" / "model.pt")
    assert weights.keys() == torch.load(tmp_path / "eager" / "model.pt").keys()


def test_compiled_graphs_do_not_outlive_their_run(make_cfg, tmp_path, compiled_models):
    """A multirun's jobs share one process: the next job starts with no block graphs cached."""
    run(make_cfg(*COMMON, "trainer.compile=true"), run_dir=str(tmp_path / "a"))
    assert _block_cache_entries() == 0
    run(make_cfg(*COMMON, "trainer.compile=true", "model.d_model=48", "model.num_heads=4"),
        run_dir=str(tmp_path / "b"))
    assert _block_cache_entries() == 0
    assert [entries for _, _, entries in compiled_models] == [0, 0]


def test_compiled_resume_continues_the_same_curve(make_cfg, tmp_path):
    """Interrupted after 4 steps and resumed (recompiling), the losses equal an uninterrupted
    compiled run's to 1e-6, as eager resume does."""
    common = [*COMMON, "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.compile=true"]
    run(make_cfg(*common), run_dir=str(tmp_path / "full"))
    part = run(make_cfg(*common, "trainer.steps_per_run=4"), run_dir=str(tmp_path / "split"))
    assert part["steps"] == 4 and not part["complete"]
    resumed = run(make_cfg(*common), run_dir=str(tmp_path / "split"))
    assert resumed["steps"] == 8 and resumed["complete"]
    a, b = read_scalars(str(tmp_path / "full")), read_scalars(str(tmp_path / "split"))
    for step in range(1, 9):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6), step


def test_compile_with_ddp_matches_one_eager_process(tmp_path):
    """torchrun, 2 gloo processes, trainer.compile=true: the single eager process's losses."""
    args = [*COMMON, "trainer.threads=1"]
    single = tmp_path / "single"
    proc = run_cli(*tiny_cli_args(single, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = tmp_path / "ddp"
    proc = torchrun(*tiny_cli_args(multi, *args, "parallel=ddp", "trainer.compile=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_scalars(str(single)), read_scalars(str(multi))
    for step in range(1, 7):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=2e-4), step
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["components"]["compile"] is True
