"""Tests for trainer.qlinear / trainer.quantize: quantizers, packing, quantized layers, QAT, save/load."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

from models.build import build_model
from trainer.config import ConfigError
from trainer.data import VOCAB_SIZE
from trainer.qlinear import (DynamicInt8Linear, FakeQuantLinear, Int4WeightLinear, Int8WeightLinear,
                             dequantize_int4, fake_quant_int8, fused_op_works, kernel_policy, pack_int4,
                             quantize_int4, quantize_int8, unpack_int4)
from trainer.quantize import (apply_ptq, apply_qat, block_linears, finalize_qat, linear_state, load_quantized,
                              state_dict_bytes)

# Relative output error bounds on random data: int8 rounding is 1/254 of a row's range per
# element; int4 is 1/30 of a group's range (asymmetric), a few percent after summing.
# Measured on test_quantized_linear_matches_float's data: weight_int8 0.0039, dynamic_int8 0.0076
# (activations rounded too), weight_int4 0.060; the bounds are ~2.5x those.
BOUNDS = {"weight_int8": 0.01, "dynamic_int8": 0.02, "weight_int4": 0.15}
FUSED_OPS = {"weight_int8": "int8pack", "dynamic_int8": "int_mm", "weight_int4": "int4pack"}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors run faster on one thread than with intra-op fan-out."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _layer(method: str, linear: nn.Linear) -> nn.Module:
    if method == "weight_int4":
        return Int4WeightLinear.from_float(linear, 32)
    return (Int8WeightLinear if method == "weight_int8" else DynamicInt8Linear).from_float(linear)


def _model(make_cfg, *overrides: str) -> tuple[nn.Module, object]:
    cfg = make_cfg("model.d_model=64", "model.d_ff=128", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    return model.eval(), cfg


def _tokens(cfg, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    assert int(q.abs().max(dim=1).values.min()) == 127  # each row's absmax uses the full range
    err = (q.float() * scale - w).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())


def test_int8_zero_row_is_exact() -> None:
    w = torch.zeros(4, 8)
    q, scale = quantize_int8(w)
    assert torch.equal(q.float() * scale, w) and torch.isfinite(scale).all()


def test_int4_pack_unpack_is_exact() -> None:
    q = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (24, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0], q[:, 0] + 16 * q[:, 1])  # low nibble = even column


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_int4_groupwise_error_bound(group_size: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[0, 0] = 50.0  # an outlier may only coarsen its own group
    packed, scale, zero = quantize_int4(w, group_size)
    assert scale.shape == zero.shape == (32, 128 // group_size)
    deq = dequantize_int4(packed, scale, zero)
    # Asymmetric min/max: 16 levels spanning each group's range, so every group uses 0 and 15.
    groups = w.reshape(32, -1, group_size)
    torch.testing.assert_close(scale.float(), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=1e-3, atol=1e-7)
    q = unpack_int4(packed).reshape(32, -1, group_size)
    assert bool((q.amin(-1) == 0).all()) and bool((q.amax(-1) == 15).all())
    step = scale.float().repeat_interleave(group_size, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-3 * step + 1e-6).all())
    others = (deq - w)[:, group_size:].abs().max()
    assert float(others) < 0.5, "the outlier's group scale leaked into other groups"


@pytest.mark.parametrize("method", list(BOUNDS))
@pytest.mark.parametrize("policy", ["reference", "fused"])
def test_quantized_linear_matches_float(method: str, policy: str) -> None:
    """Output relative error vs the fp32 nn.Linear under the stated bound, with either kernel."""
    if policy == "fused" and not fused_op_works(FUSED_OPS[method], "cpu", torch.float32):
        pytest.skip(f"torch.{FUSED_OPS[method]} is not available in this build")
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    x = torch.randn(2, 10, 128)
    layer = _layer(method, linear)
    with kernel_policy(policy), torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 10, 96) and y.dtype == torch.float32
    assert ("dequantize" in layer.kernel or "fp32" in layer.kernel) == (policy == "reference")
    assert _rel(y, linear(x).detach()) < BOUNDS[method]


@pytest.mark.parametrize("method", list(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_equals_reference(method: str, dtype: torch.dtype) -> None:
    """torch's fused op and the dequantize fallback compute the same numbers (up to dtype rounding)."""
    if not fused_op_works(FUSED_OPS[method], "cpu", torch.int8 if method == "dynamic_int8" else dtype):
        pytest.skip("fused op unavailable")
    torch.manual_seed(0)
    layer = _layer(method, nn.Linear(64, 48, bias=False))
    x = torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        with kernel_policy("fused"):
            fused = layer(x)
        with kernel_policy("reference"):
            ref = layer(x)
    assert fused.dtype == ref.dtype == dtype
    assert _rel(fused, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_auto_policy_uses_int_kernels_only_where_faster_on_cpu() -> None:
    layer = Int8WeightLinear.from_float(nn.Linear(64, 48))
    with torch.no_grad():
        layer(torch.randn(3, 64))
        assert layer.kernel == "dequantize+matmul"  # fp32 activations: MKL sgemm wins
        if fused_op_works("int8pack", "cpu", torch.bfloat16):
            layer(torch.randn(3, 64, dtype=torch.bfloat16))
            assert layer.kernel == "_weight_int8pack_mm"


@pytest.mark.parametrize("method,low,high", [("weight_int8", 3.6, 4.05), ("dynamic_int8", 3.6, 4.05),
                                             ("weight_int4", 5.5, 8.0)])
def test_serialized_size_of_block_linears(make_cfg, method: str, low: float, high: float) -> None:
    """int8: ~4x smaller (1 byte + a per-row scale); int4 at group 32: ~6.4x (4 bits + 2 fp16 per 32)."""
    model, cfg = _model(make_cfg, "model.d_model=128", "model.d_ff=512")
    fp32 = state_dict_bytes(linear_state(model))
    fp32_data = sum(t.numel() * t.element_size() for t in linear_state(model).values())
    quant = apply_ptq(model, method, 32)  # in place
    ratio = fp32 / state_dict_bytes(linear_state(quant))
    assert low < ratio < high, ratio
    # Bytes counted from the shapes alone: (out, in) of qkv, out, up, down in every block.
    d, f, layers = 128, 512, cfg.model.num_layers
    shapes = [(3 * d, d), (d, d), (f, d), (d, f)] * layers
    weights = sum(n * k for n, k in shapes)
    if method == "weight_int4":  # half a byte per weight + fp16 scale and zero per 32 inputs
        data, tensors = weights // 2 + 2 * 2 * weights // 32, 3 * len(shapes)
    else:  # one byte per weight + one fp32 scale per output row
        data, tensors = weights + 4 * sum(n for n, _ in shapes), 2 * len(shapes)
    state = linear_state(quant)
    assert len(state) == tensors
    assert sum(t.numel() * t.element_size() for t in state.values()) == data
    assert data < state_dict_bytes(state) < data + 512 * tensors  # + torch.save's per-tensor zip entry
    assert fp32_data == 4 * weights
    assert state_dict_bytes(quant.state_dict()) < state_dict_bytes(_model(make_cfg, "model.d_model=128",
                                                                          "model.d_ff=512")[0].state_dict())


@pytest.mark.parametrize("model_kind,per_block", [("decoder", 4), ("encoder_decoder", None)])
def test_only_block_linears_are_quantized(make_cfg, model_kind: str, per_block: int | None) -> None:
    model, cfg = _model(make_cfg, f"model={model_kind}")
    names = [name for name, *_ in block_linears(model)]
    if per_block:
        assert len(names) == per_block * cfg.model.num_layers
    assert any(n.endswith("cross_attn.q") for n in names) == (model_kind == "encoder_decoder")
    apply_ptq(model, "weight_int8")
    assert not block_linears(model)
    assert isinstance(model.embed, nn.Embedding) and model.embed.weight.dtype == torch.float32


def test_fake_quant_straight_through_gradients() -> None:
    """Rounding acts as identity backwards: grad_W = g^T fq(x), grad_x = g fq(W)."""
    torch.manual_seed(0)
    plain = nn.Linear(32, 16)
    fq = FakeQuantLinear.from_float(plain)
    x = torch.randn(6, 32, requires_grad=True)
    g = torch.randn(6, 16)
    (fq(x) * g).sum().backward()
    fq_wgrad, fq_xgrad = fq.weight.grad.clone(), x.grad.clone()
    assert fq_wgrad.abs().sum() > 0
    torch.testing.assert_close(fq_wgrad, g.t() @ fake_quant_int8(x.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fq_xgrad, g @ fake_quant_int8(plain.weight.detach()), rtol=1e-5, atol=1e-6)
    plain.weight.grad = None
    x.grad = None
    (nn.functional.linear(x, plain.weight, plain.bias) * g).sum().backward()
    assert _rel(fq_wgrad, plain.weight.grad) < 0.02  # differs only by x's rounding


def test_fake_quant_forward_rounds() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    with torch.no_grad():
        y_fq, y = FakeQuantLinear.from_float(plain)(x), plain(x)
    assert 0 < _rel(y_fq, y) < 0.02


def test_apply_qat_keeps_state_dict_and_matches_conversion(make_cfg) -> None:
    model, cfg = _model(make_cfg)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    assert apply_qat(model, make_cfg("quantize=weight_int8").quantize) is model  # other methods: identity
    qat = apply_qat(model, make_cfg("quantize=qat_int8").quantize)
    assert {k: v.shape for k, v in qat.state_dict().items()} == keys
    assert sum(isinstance(m, FakeQuantLinear) for m in qat.modules()) == 4 * cfg.model.num_layers
    weights = finalize_qat(qat, qat.state_dict())
    plain, _ = _model(make_cfg)
    plain.load_state_dict(weights)  # strict: a plain model takes the QAT weights as they are
    tokens = _tokens(cfg)
    converted = apply_ptq(plain, "qat_int8")
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), qat(tokens), rtol=1e-4, atol=1e-4)


def test_int4_group_size_is_checked_before_training(make_cfg) -> None:
    model, _ = _model(make_cfg)
    with pytest.raises(ConfigError, match="quantize.group_size=48"):
        apply_qat(model, make_cfg("quantize=weight_int4", "quantize.group_size=48").quantize)


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_int8", "weight_int4", "qat_int8"])
def test_load_quantized_round_trip(make_cfg, tmp_path, method: str) -> None:
    model, cfg = _model(make_cfg, f"quantize={method}")
    quant = apply_ptq(model, method, cfg.quantize.group_size)
    path = tmp_path / f"model_{method}.pt"
    torch.save(quant.state_dict(), path)
    loaded = load_quantized(str(path), cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quant(tokens))
    assert {type(m) for m in loaded.modules()} == {type(m) for m in quant.modules()}


def test_int4_kernel_cache_follows_loaded_weights() -> None:
    """The fused int4 kernel's cached layout is rebuilt when load_state_dict overwrites the buffers."""
    if not fused_op_works("int4pack", "cpu", torch.float32):
        pytest.skip("fused op unavailable")
    torch.manual_seed(0)
    a, b = (Int4WeightLinear.from_float(nn.Linear(64, 32), 32) for _ in range(2))
    x = torch.randn(3, 64)
    with kernel_policy("fused"), torch.no_grad():
        a(x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(BOUNDS))
@pytest.mark.parametrize("rows", [8, 64])  # cuBLAS int8 GEMM needs more than 16 rows
def test_cuda_kernels_match_reference(method: str, rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96).cuda()
    layer = _layer(method, linear)
    x = torch.randn(rows, 128, device="cuda")
    with torch.no_grad():
        with kernel_policy("auto"):
            auto = layer(x)
            kernel = layer.kernel
        with kernel_policy("reference"):
            ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = layer(x)
    if method == "dynamic_int8":
        assert (kernel == "_int_mm") == (rows > 16 and fused_op_works("int_mm", str(x.device), torch.int8))
    assert _rel(auto, ref) < 1e-4
    assert half.dtype == torch.bfloat16 and _rel(half, ref) < 2e-2
    assert _rel(auto, linear(x)) < BOUNDS[method]
