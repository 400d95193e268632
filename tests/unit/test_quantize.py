"""Tests for trainer.quantize (torchao methods, QAT, save/load) and the int4 fallback in trainer.qlinear."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from models.build import build_model
from trainer.errors import ConfigError
from trainer.data import VOCAB_SIZE
from trainer.quantize.int4_linear import Int4WeightLinear, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from trainer.quantize import _ao, _ptq_config, apply_ptq, apply_qat, block_linears, finalize_qat, linear_state, load_quantized, quantized_layers, state_dict_bytes, tensor_bytes

# Relative output error bounds on random data: int8 rounding is 1/254 of a row's range per
# element; int4 is 1/30 of a group's range (asymmetric), a few percent after summing.
# Measured on test_quantized_linear_matches_float's data: weight_int8 0.0039, dynamic_int8 0.0076
# (activations rounded too), weight_int4 0.060; the bounds are ~2.5x those.
BOUNDS = {"weight_int8": 0.01, "dynamic_int8": 0.02, "weight_int4": 0.15}


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
    """One quantized layer the way apply_ptq makes it on this CPU (torchao config, or the int4 fallback)."""
    if method == "weight_int4":
        return Int4WeightLinear.from_float(linear, 32)
    _ao().quantize_(linear, _ptq_config(method, 32))
    return linear


def _model(make_cfg, *overrides: str) -> tuple[nn.Module, object]:
    cfg = make_cfg("model.d_model=64", "model.d_ff=128", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    return model.eval(), cfg


def _tokens(cfg, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))


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
    groups = w.reshape(32, -1, group_size)
    torch.testing.assert_close(scale.float(), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=1e-3, atol=1e-7)
    q = unpack_int4(packed).reshape(32, -1, group_size)
    assert bool((q.amin(-1) == 0).all()) and bool((q.amax(-1) == 15).all())
    step = scale.float().repeat_interleave(group_size, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-3 * step + 1e-6).all())
    others = (deq - w)[:, group_size:].abs().max()
    assert float(others) < 0.5, "the outlier's group scale leaked into other groups"


@pytest.mark.parametrize("method", list(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_float(method: str, dtype: torch.dtype) -> None:
    """Output relative error vs the float nn.Linear under the stated bound (bf16: under autocast)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    x = torch.randn(2, 10, 128)
    ref = linear(x).detach()
    layer = _layer(method, linear)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
    assert y.shape == (2, 10, 96)
    assert _rel(y, ref) < BOUNDS[method] + (1e-2 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("method,op,absent", [("dynamic_int8", "aten::_int_mm", "aten::mm"),
                                              ("weight_int8", "aten::mm", "aten::_int_mm"),
                                              ("qat_int8", "aten::_int_mm", "aten::mm")])
def test_the_named_kernel_is_the_one_that_runs(method: str, op: str, absent: str) -> None:
    """The report's kernel column for torchao int8 on CPU: dynamic -> torch._int_mm, weight-only -> mm."""
    from trainer.quantize import plan

    layer = _layer(method, nn.Linear(64, 48))
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        layer(torch.randn(5, 64))
    ran = {e.name for e in prof.events()}
    assert op in ran and absent not in ran, sorted(n for n in ran if "mm" in n)
    label = plan(method, torch.device("cpu"))["kernel"]
    assert ("torch._int_mm" in label) == (op == "aten::_int_mm") and ("torch.mm" in label) == (op == "aten::mm")


def test_int4_falls_back_on_cpu_and_says_so() -> None:
    from trainer.quantize import plan

    info = plan("weight_int4", torch.device("cpu"), 32)
    assert info["library"] == "trainer (fallback)" and "Int4WeightLinear" in info["config"]
    assert "no kernel here" in info["fallback"] and "CUDA" in info["fallback"]
    assert plan("dynamic_int8", torch.device("cpu"))["fallback"] == ""
    with pytest.raises(ConfigError, match="quantize='int3'"):
        plan("int3", torch.device("cpu"))


@pytest.mark.parametrize("method,low", [("weight_int8", 1 / 0.30), ("dynamic_int8", 1 / 0.30),
                                        ("weight_int4", 1 / 0.20)])
def test_serialized_size_of_block_linears(make_cfg, method: str, low: float) -> None:
    """int8 <= 0.30x of the block linears' fp32 bytes, int4 (group 32) <= 0.20x; data bytes exact."""
    model, cfg = _model(make_cfg, "model.d_model=128", "model.d_ff=512")
    fp32_state = linear_state(model)
    fp32 = state_dict_bytes(fp32_state)
    quant = apply_ptq(model, method, 32)  # in place
    state = linear_state(quant)
    ratio = fp32 / state_dict_bytes(state)
    assert ratio >= low, ratio
    # Bytes counted from the shapes alone: (out, in) of qkv, out, up, down in every block.
    d, f, layers = 128, 512, cfg.model.num_layers
    shapes = [(3 * d, d), (d, d), (f, d), (d, f)] * layers
    weights = sum(n * k for n, k in shapes)
    if method == "weight_int4":  # half a byte per weight + fp16 scale and zero per 32 inputs (+ fp32 bias)
        data, tensors = weights // 2 + 2 * 2 * weights // 32, 3 * len(shapes)
    else:  # torchao Int8Tensor: one byte per weight + fp32 scale and int8 zero point per output row
        data, tensors = weights + 5 * sum(n for n, _ in shapes), len(shapes)
    bias = sum(tensor_bytes(v) for k, v in state.items() if k.endswith(".bias"))
    assert sum(1 for k in state if not k.endswith(".bias")) == tensors
    assert sum(tensor_bytes(v) for v in state.values()) == data + bias
    assert sum(tensor_bytes(v) for v in fp32_state.values()) == 4 * weights + bias


@pytest.mark.parametrize("model_kind,per_block", [("decoder", 4), ("encoder_decoder", None)])
def test_only_block_linears_are_quantized(make_cfg, model_kind: str, per_block: int | None) -> None:
    model, cfg = _model(make_cfg, f"model={model_kind}", "model.tie_embeddings=false")  # an untied head too
    names = [name for name, *_ in block_linears(model)]
    if per_block:
        assert len(names) == per_block * cfg.model.num_layers
    assert any(n.endswith("cross_attn.q") for n in names) == (model_kind == "encoder_decoder")
    apply_ptq(model, "weight_int8")
    assert quantized_layers(model) == len(names)
    assert all(type(lin.weight).__name__ == "Int8Tensor" for *_, lin in block_linears(model))
    assert isinstance(model.embed, nn.Embedding) and type(model.embed.weight) is nn.Parameter
    assert model.embed.weight.dtype == torch.float32
    assert isinstance(model.head, nn.Linear) and type(model.head.weight) is nn.Parameter  # the head stays float


def test_qat_fake_quant_straight_through_gradients(make_cfg) -> None:
    """torchao's fake quantization rounds forward and is the identity backward inside the int8 grid
    (clipped STE): grad_W = (g^T fq(x)) * [W on the grid], grad_x = (g fq(W)) * [x on the grid]."""
    model, cfg = _model(make_cfg)
    apply_qat(model, make_cfg("quantize=qat_int8").quantize)
    fq = block_linears(model)[0][3]
    assert type(fq).__name__ == "FakeQuantizedLinear"
    x = torch.randn(6, fq.in_features, requires_grad=True)
    g = torch.randn(6, fq.out_features)
    (fq(x) * g).sum().backward()
    wq, aq = fq.weight_fake_quantizer, fq.activation_fake_quantizer
    with torch.no_grad():
        fq_x, fq_w = aq(x), wq(fq.weight)
        assert 0 < _rel(fq_x, x) < 0.02 and 0 < _rel(fq_w, fq.weight) < 0.02  # it does round
        torch.testing.assert_close(fq(x), nn.functional.linear(fq_x, fq_w, fq.bias))

        def at_edge(t: torch.Tensor, q) -> torch.Tensor:  # within one step of the int8 grid's ends
            level = t / q.scale.reshape(t.shape[0], -1) + q.zero_point.reshape(t.shape[0], -1)
            return (level > 126) | (level < -127)

        for grad, ste, edge in ((fq.weight.grad, g.t() @ fq_x, at_edge(fq.weight, wq)),
                                (x.grad, g @ fq_w, at_edge(x, aq))):
            off = ~torch.isclose(grad, ste, rtol=1e-5, atol=1e-5)
            assert float(off.float().mean()) < 0.02, "STE everywhere but the clipped edge"
            assert bool((grad[off] == 0).all()) and bool(edge[off].all())


def test_apply_qat_keeps_state_dict_and_matches_conversion(make_cfg) -> None:
    model, cfg = _model(make_cfg)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    assert apply_qat(model, make_cfg("quantize=weight_int8").quantize) is model  # other methods: identity
    qat = apply_qat(model, make_cfg("quantize=qat_int8").quantize)
    assert {k: v.shape for k, v in qat.state_dict().items()} == keys
    assert sum(type(m).__name__ == "FakeQuantizedLinear" for m in qat.modules()) == 4 * cfg.model.num_layers
    weights = finalize_qat(qat, qat.state_dict())
    plain, _ = _model(make_cfg)
    plain.load_state_dict(weights)  # strict: a plain model takes the QAT weights as they are
    tokens = _tokens(cfg)
    converted = apply_ptq(plain, "qat_int8")
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), qat(tokens), rtol=1e-4, atol=1e-4)
    # and converting the prepared model itself (QATConfig step="convert") gives the same model
    with torch.no_grad():
        torch.testing.assert_close(apply_ptq(qat, "qat_int8")(tokens), converted(tokens), rtol=0, atol=0)


def test_int4_group_size_is_checked_before_training(make_cfg) -> None:
    model, _ = _model(make_cfg)
    with pytest.raises(ConfigError, match="quantize.group_size=48"):
        apply_qat(model, make_cfg("quantize=weight_int4", "quantize.group_size=48").quantize)


def test_bad_compile_choice_is_checked_before_training(make_cfg) -> None:
    model, _ = _model(make_cfg)
    with pytest.raises(ConfigError, match="quantize.compile='sometimes'"):
        apply_qat(model, make_cfg("quantize=weight_int8", "quantize.compile=sometimes").quantize)


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_int8", "weight_int4", "qat_int8"])
def test_load_quantized_round_trip(make_cfg, tmp_path, method: str) -> None:
    model, cfg = _model(make_cfg, f"quantize={method}")
    quant = apply_ptq(model, method, cfg.quantize.group_size)
    path = tmp_path / f"model_{method}.pt"
    torch.save(quant.state_dict(), path)
    torch.load(path, weights_only=True)  # torchao's tensor subclasses are on the weights_only allow-list
    loaded = load_quantized(str(path), cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quant(tokens))
    assert {type(m) for m in loaded.modules()} == {type(m) for m in quant.modules()}
    assert quantized_layers(loaded) == quantized_layers(quant) == 4 * cfg.model.num_layers


def test_missing_torchao_is_one_sentence_with_versions(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"tested: torch 2\.13\.0 \+ torchao 0\.18\.0"):
        _ao()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(BOUNDS))
def test_cuda_methods_match_float(method: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96).cuda()
    x = torch.randn(64, 128, device="cuda")
    ref = linear(x).detach()
    layer = _layer(method, linear)
    with torch.no_grad():
        assert _rel(layer(x), ref) < BOUNDS[method]


def test_int4_fallback_file_loads_whatever_the_config_says(make_cfg, tmp_path) -> None:
    """The fallback's group size is read off the file (a run quantized later by `python -m trainer.quantize`
    keeps quantize=none and group_size=32 in its config)."""
    model, cfg = _model(make_cfg)
    quant = apply_ptq(model, "weight_int4", 64)
    torch.save(quant.state_dict(), tmp_path / "model_weight_int4.pt")
    loaded = load_quantized(str(tmp_path / "model_weight_int4.pt"), cfg)  # cfg: quantize=none, group_size=32
    assert {m.group_size for m in loaded.modules() if isinstance(m, Int4WeightLinear)} == {64}
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quant(tokens))
