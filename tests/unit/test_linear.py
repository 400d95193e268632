"""models.linear: fp32 CPU linears on oneDNN compute what F.linear computes, and only where meant."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.ops.linear as lin

pytestmark = pytest.mark.skipif(not lin._onednn_linear_works(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple]:
    """Force the oneDNN path and record each call of its autograd function (input shapes)."""
    calls: list[tuple] = []
    real = lin._OneDNNLinear.apply
    monkeypatch.setattr(lin, "FP32_GEMM_OVERRIDE", "onednn")
    monkeypatch.setattr(lin._OneDNNLinear, "apply", lambda x, w, b: calls.append((tuple(x.shape), b is not None))
                        or real(x, w, b))
    return calls


def _leaves(shape, d_in: int, d_out: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, generator=g, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,bias", [((7,), False), ((3, 5), True), ((2, 3, 4), False), ((2, 9), True)])
def test_onednn_linear_matches_f_linear_in_value_and_gradients(onednn_calls, shape, bias) -> None:
    """y = x W^T + b and dx, dW, db equal F.linear's (float64 reference) to fp32 rounding."""
    x, w, b = _leaves(shape, 48, 80, bias)
    upstream = torch.randn(*shape, 80, generator=torch.Generator().manual_seed(1))
    y = lin.linear(x, w, b)
    y.backward(upstream)
    assert onednn_calls == [(tuple(shape) + (48,), bias)]
    got = [y.detach(), x.grad, w.grad] + ([b.grad] if bias else [])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(upstream.double())
    want = [y64.detach(), x64.grad, w64.grad] + ([b64.grad] if bias else [])
    assert y.shape == y64.shape and y.dtype == torch.float32
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=1e-5, atol=1e-5)


def test_onednn_linear_is_deterministic_and_skips_unneeded_gradients(onednn_calls) -> None:
    """Same inputs, bit-identical outputs (a run and its resume replay the same numbers); a frozen
    weight gets no gradient and the input still does."""
    x, w, _ = _leaves((4, 16), 64, 32, False)
    assert torch.equal(lin.linear(x, w), lin.linear(x, w))
    w.requires_grad_(False)
    lin.linear(x, w).sum().backward()
    assert w.grad is None and x.grad is not None and x.grad.shape == x.shape


def test_other_dtypes_autocast_and_subclassed_weights_take_f_linear(onednn_calls) -> None:
    x, w, _ = _leaves((4,), 16, 8, False)
    lin.linear(x.detach().bfloat16(), w.detach().bfloat16())  # bf16: oneDNN already, via F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.linear(x, w).dtype == torch.bfloat16  # autocast decides the dtype: F.linear
    lin.linear(x.detach().double(), w.detach().double())

    class Quantized(torch.Tensor):  # a tensor subclass weight, as torchao's quantized weights are
        pass

    lin.linear(x.detach(), w.detach().as_subclass(Quantized))
    assert onednn_calls == []
    lin.linear(x, w)
    assert len(onednn_calls) == 1


def test_linear_module_keeps_nn_linear_parameters_and_routes_through_linear(onednn_calls) -> None:
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 6)
    torch.manual_seed(0)
    mod = lin.Linear(12, 6)
    assert isinstance(mod, torch.nn.Linear)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(mod.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(3, 12)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-6, atol=1e-6)
    assert onednn_calls == [((3, 12), True)]


def test_backend_choice_by_vendor_and_environment(monkeypatch) -> None:
    """AMD -> oneDNN, other vendors -> BLAS; TRAINER_CPU_FP32_GEMM overrides; a bad value is one
    sentence naming the variable and the valid values."""
    def choose(vendor: str, env: str | None) -> str:
        lin.cpu_fp32_gemm_backend.cache_clear()
        monkeypatch.setattr(lin, "_cpu_vendor", lambda: vendor)
        if env is None:
            monkeypatch.delenv("TRAINER_CPU_FP32_GEMM", raising=False)
        else:
            monkeypatch.setenv("TRAINER_CPU_FP32_GEMM", env)
        return lin.cpu_fp32_gemm_backend()

    try:
        assert choose("AuthenticAMD", None) == "onednn"
        assert choose("GenuineIntel", None) == "blas"
        assert choose("", None) == "blas"
        assert choose("GenuineIntel", "onednn") == "onednn"
        assert choose("AuthenticAMD", "BLAS") == "blas"
        with pytest.raises(ValueError, match=r"TRAINER_CPU_FP32_GEMM='mkl': valid values are onednn, blas"):
            choose("AuthenticAMD", "mkl")
    finally:
        monkeypatch.undo()
        lin.cpu_fp32_gemm_backend.cache_clear()
