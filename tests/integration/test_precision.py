"""Precision in effect during real training steps: autocast dtypes, the fp16 GradScaler's skipped
steps (scale, count, schedule), and fp16 resume parity across separate processes."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_cli, tiny_cli_args
from tb import read_scalars
from trainer.run import run

LR = 2e-3
FLOOR = 0.1  # schedule.min_lr_ratio


def _lr_factor(k: int, warmup: int, max_steps: int) -> float:
    """The schedule by hand at optimizer step k: linear warmup, then cosine down to FLOOR."""
    if k < warmup:
        return (k + 1) / warmup
    progress = min(1.0, (k - warmup) / max(1, max_steps - warmup))
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def _series(scalars: dict, tag: str, steps: int) -> list[float]:
    assert sorted(scalars[tag]) == list(range(1, steps + 1)), tag
    return [scalars[tag][s] for s in range(1, steps + 1)]


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_block_linears_run_in_the_chosen_precision(tmp_path, monkeypatch, precision, dtype):
    """Forward hooks on the first block's attention and FFN linears, during real training steps."""
    import trainer.run as run_mod

    seen: dict[str, set] = {}
    import trainer.runs.model as model_mod

    real_build_model = model_mod.build_model

    def build_model(*a, **kw):
        model = real_build_model(*a, **kw)
        block = model.decoder.blocks[0]
        for name, mod in [("qkv", block.self_attn.qkv), ("out", block.self_attn.out),
                          ("up", block.ffn.up), ("down", block.ffn.down)]:
            def hook(module, inputs, output, name=name):
                if module.training:  # training steps only, not evaluation
                    seen.setdefault(name, set()).add(output.dtype)
            mod.register_forward_hook(hook)
        return model

    monkeypatch.setattr(model_mod, "build_model", build_model)
    run(compose_cfg(f"precision={precision}", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.eval_batches=1"),
        run_dir=str(tmp_path))
    assert seen == {name: {dtype} for name in ("qkv", "out", "up", "down")}, seen
    weights = torch.load(tmp_path / "model.pt")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}  # fp32 master weights


def _initial_weights(cfg) -> dict:
    """The model run() starts from: every generator seeded with cfg.seed, then build_model."""
    from models.build import build_model
    from trainer.data import VOCAB_SIZE

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    return model.state_dict()


def test_fp16_overflow_skips_halve_the_scale_and_freeze_the_schedule(tmp_path):
    """init_scale=1e30 overflows fp16 gradients: every step is skipped, the scale halves exactly
    each time, skipped_steps counts them, the lr stays at schedule step 0, the weights never move."""
    steps, warmup = 6, 2
    cfg = compose_cfg("precision=fp16", "precision.init_scale=1e30", f"trainer.max_steps={steps}",
                      f"schedule.warmup_steps={warmup}", "trainer.log_every=1", "trainer.eval_every=100",
                      "trainer.checkpoint_every=100")
    summary = run(cfg, run_dir=str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    scale = _series(scalars, "train/loss_scale", steps)
    init = float(torch.tensor(1e30, dtype=torch.float32))  # the scaler keeps its scale in fp32
    assert scale == pytest.approx([init * 0.5**s for s in range(1, steps + 1)], rel=1e-6)
    assert all(a / b == 2.0 for a, b in zip(scale, scale[1:]))  # exact halvings
    assert _series(scalars, "train/skipped_steps", steps) == [float(s) for s in range(1, steps + 1)]
    assert summary["skipped_steps"] == steps
    assert all(math.isfinite(v) for v in _series(scalars, "train/loss", steps))
    assert _series(scalars, "train/lr", steps) == pytest.approx([LR * _lr_factor(0, warmup, steps)] * steps,
                                                                rel=1e-6)
    initial = _initial_weights(cfg)
    final = torch.load(tmp_path / "model.pt")
    assert final.keys() == initial.keys()
    for k, v in initial.items():
        assert torch.equal(final[k], v), k


def test_fp16_schedule_advances_only_on_steps_taken(tmp_path):
    """init_scale=1e6: the first steps overflow, later ones update. The lr each step uses is the
    schedule at the number of updates taken before it; the scale halves exactly on skips only."""
    steps, warmup = 12, 3
    cfg = compose_cfg("precision=fp16", "precision.init_scale=1e6", f"trainer.max_steps={steps}",
                      f"schedule.warmup_steps={warmup}", "trainer.log_every=1", "trainer.eval_every=100",
                      "trainer.checkpoint_every=100")
    summary = run(cfg, run_dir=str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    skipped = [0.0] + _series(scalars, "train/skipped_steps", steps)  # skipped[s]: after step s
    scale = [float(torch.tensor(1e6, dtype=torch.float32))] + _series(scalars, "train/loss_scale", steps)
    lr = _series(scalars, "train/lr", steps)
    assert summary["skipped_steps"] == skipped[-1]
    assert 1 <= skipped[-1] <= steps - 3, skipped  # both kinds of step happened
    for s in range(1, steps + 1):
        was_skipped = skipped[s] - skipped[s - 1]
        assert was_skipped in (0.0, 1.0), skipped
        assert scale[s] == (scale[s - 1] / 2 if was_skipped else scale[s - 1]), (s, scale)
        updates_before = (s - 1) - int(skipped[s - 1])
        assert lr[s - 1] == pytest.approx(LR * _lr_factor(updates_before, warmup, steps), rel=1e-6), s


def test_fp16_resume_in_a_new_process_is_bit_exact(tmp_path):
    """fp16 with overflowing first steps, stopped at step 4 (mid-skipping) and resumed by a fresh
    CLI process: every step's loss, scale, skip count and lr match an uninterrupted run."""
    common = ["precision=fp16", "precision.init_scale=1e8", "trainer.max_steps=12", "trainer.log_every=1",
              "trainer.eval_every=6", "trainer.checkpoint_every=4"]
    full, split = tmp_path / "full", tmp_path / "split"
    run(compose_cfg(*common), run_dir=str(full))
    part = run(compose_cfg(*common, "trainer.steps_per_run=4"), run_dir=str(split))
    assert part["steps"] == 4 and not part["complete"]
    assert sorted(p.name for p in (split / "checkpoints").iterdir())[-1] == "step_00000004.pt"
    proc = run_cli(*tiny_cli_args(split, *common))  # a separate process: nothing carried in memory
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "at step 4" in proc.stderr, proc.stderr
    a, b = read_scalars(str(full)), read_scalars(str(split))
    skipped = _series(a, "train/skipped_steps", 12)
    assert skipped[3] == 4 and skipped[-1] < 12, skipped  # the split falls while steps are skipped
    for tag in ("train/loss", "train/loss_scale", "train/skipped_steps", "train/lr"):
        assert _series(b, tag, 12) == pytest.approx(_series(a, tag, 12), abs=1e-6, rel=1e-6), tag
    for s in (6, 12):
        assert b["eval/loss"][s] == pytest.approx(a["eval/loss"][s], abs=1e-6)
