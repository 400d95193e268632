"""run(cfg) with quantize=<method> end to end: training, the PTQ report, its files and numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tb import read_scalars
from trainer.quantize import load_quantized
from trainer.run import run

# A few dozen steps: enough for a model whose quantization error is measurable against real learning.
# One thread: matmuls this small gain nothing from more, and a busy machine makes extra threads stall.
SHORT = ["trainer.threads=1", "model.d_model=64", "model.d_ff=128", "trainer.max_steps=30", "trainer.eval_every=30",
         "trainer.log_every=1", "trainer.checkpoint_every=30", "optim.lr=3e-3", "schedule.warmup_steps=5",
         "trainer.eval_batches=3", "quantize.eval_batches=3", "quantize.latency_batches=2"]
# Max |quantized - fp32| eval loss, nats.
MARGIN = {"dynamic_int8": 0.1, "weight_int8": 0.1, "qat_int8": 0.1, "weight_int4": 0.3}


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_int8", "weight_int4", "qat_int8"])
def test_quantize_method_end_to_end(make_cfg, tmp_path, method: str) -> None:
    cfg = make_cfg(*SHORT, f"quantize={method}")
    summary = run(cfg, run_dir=str(tmp_path))
    report = summary["quantize"]
    assert report["method"] == method and report["quantized_layers"] == 4 * cfg.model.num_layers
    for key in ("size_mb", "size_ratio", "latency_ms", "speedup", "eval_loss", "accuracy"):
        assert math.isfinite(report[key]) and report[key] >= 0, key
    assert report["size_ratio"] > 1.2  # the embedding stays fp32, so the whole model shrinks less than 4x
    assert report["linears_ratio"] > (5.0 if method == "weight_int4" else 3.5)
    assert abs(report["loss_delta"]) < MARGIN[method], report["loss_delta"]
    assert report["fp32"]["eval_loss"] == pytest.approx(summary["eval/loss"], abs=1e-4)  # same batches as eval

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["quantize"]["size_ratio"] == pytest.approx(report["size_ratio"])
    table = (tmp_path / "quantize.md").read_text()
    assert "| fp32 |" in table and "embedding" in table
    loaded = load_quantized(str(tmp_path / f"model_{method}.pt"), cfg)
    tokens = torch.randint(0, 256, (2, cfg.data.seq_len))
    with torch.no_grad():
        assert torch.isfinite(loaded(tokens)).all()

    if method == "qat_int8":
        losses = read_scalars(str(tmp_path))["train/loss"]
        assert losses[max(losses)] < losses[min(losses)] - 1.0, "QAT training should learn"
        fake = report["variants"]["qat_int8 (fake-quant)"]
        # The converted model computes what training simulated.
        assert abs(fake["eval_loss"] - report["eval_loss"]) < 1e-3
        assert "qat_int8 (fake-quant)" in table
