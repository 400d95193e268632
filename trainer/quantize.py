"""Post-training quantization and quantization-aware training (placeholder interface)."""
from __future__ import annotations

import torch.nn as nn


def apply_qat(model: nn.Module, cfg) -> nn.Module:
    if cfg.method == "qat_int8":
        raise NotImplementedError("quantize=qat_int8")
    return model


def finalize_qat(model: nn.Module, weights: dict) -> dict:
    return weights


def post_training_report(cfg, model, weights, val_blocks, objective, device, run_dir) -> dict:
    raise NotImplementedError(f"quantize={cfg.quantize.method}")
