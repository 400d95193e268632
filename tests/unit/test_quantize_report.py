"""trainer.quantize.report: the rows compare_variants makes for each quantize.compile choice, and byte counts."""
from __future__ import annotations

import copy

import pytest
import torch

from models.build import build_model
from trainer.data import VOCAB_SIZE
from trainer.objectives import CausalLM
from trainer.quantize import apply_ptq, compare_variants, cpu_features, cpu_flags, tensor_bytes


def _variants(make_cfg):
    cfg = make_cfg("model.num_layers=1")
    torch.manual_seed(0)
    fp32 = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                       max_len=cfg.data.seq_len).eval()
    variants = {"fp32": (fp32, "fp32"), "weight_int8": (apply_ptq(copy.deepcopy(fp32), "weight_int8"), "fp32",
                                                        {"library": "torchao", "kernel": "mm"})}
    val = torch.randint(0, 256, (20, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    return variants, val, cfg


@pytest.mark.parametrize("mode,names", [("false", ["fp32", "weight_int8"]),
                                        ("true", ["fp32 + compile", "weight_int8 + compile"])])
def test_compile_choice_decides_the_rows(make_cfg, mode: str, names: list[str]) -> None:
    variants, val, cfg = _variants(make_cfg)
    rows = compare_variants(variants, CausalLM(), val, 4, 2, 2, torch.device("cpu"), compile=mode)
    batches = rows.pop("_batches")
    assert list(rows) == names and batches["baseline"] == names[0]
    for row in rows.values():  # ratios are the report's own numbers divided, against the baseline row
        assert row["speedup"] == pytest.approx(rows[names[0]]["latency_ms"] / row["latency_ms"], rel=1e-12)
        assert row["size_ratio"] == pytest.approx(rows[names[0]]["size_mb"] / row["size_mb"], rel=1e-12)
        assert row["compiled"] == (mode == "true")
    assert rows[names[1]]["library"] == "torchao" and rows[names[0]]["library"] == "torch"
    assert rows[names[0]]["speedup"] == 1.0 and rows[names[1]]["linears_ratio"] > 1  # tiny: pickle overhead


def test_tensor_bytes_counts_a_torchao_tensors_storages() -> None:
    lin = torch.nn.Linear(64, 48, bias=False)
    from trainer.quantize import _ao, _ptq_config

    _ao().quantize_(lin, _ptq_config("dynamic_int8", 32))
    w = lin.weight
    assert tensor_bytes(w) == 48 * 64 + 4 * 48 + 48  # int8 data, fp32 scale and int8 zero point per row
    assert tensor_bytes(w) == sum(t.numel() * t.element_size() for t in (w.qdata, w.scale, w.zero_point))
    assert w.numel() * w.element_size() == 4 * 48 * 64  # what a plain count would say: the fp32 size


def test_cpu_flags_name_each_extension() -> None:
    feats = cpu_features()
    assert list(feats) == ["AVX2", "AVX512", "AVX512-VNNI", "AMX"]
    assert cpu_flags() == ", ".join(k if v else f"no {k}" for k, v in feats.items())
    if feats["AVX512"]:
        assert feats["AVX2"]
