"""trainer.compile=auto, the attention implementation a run names, and the datasheet peak."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.ops.backend import attention_backend, sdpa_backend
from trainer.flops import datasheet_peak
from trainer.transforms.compile import compile_enabled


@pytest.mark.parametrize("choice,device,expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("true", "cpu", True), ("false", "cuda", False),
    (True, "cpu", True), (False, "cuda", False), ("True", "cpu", True), ("FALSE", "cpu", False),
])
def test_compile_auto_compiles_on_cuda_only(choice, device, expected):
    assert compile_enabled(choice, torch.device(device)) is expected


def test_compile_refuses_another_value():
    with pytest.raises(ValueError, match="trainer.compile='maybe'.*auto, true, false"):
        compile_enabled("maybe", torch.device("cpu"))


def test_sdpa_backend_follows_the_dispatcher_restrictions():
    """Restricted to one backend with `sdpa_kernel`, the name is that backend's (CPU: math, or
    the CPU flash kernel)."""
    q = torch.zeros(1, 2, 64, 16)
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_backend(q, q, q, causal=True) == "math"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert sdpa_backend(q, q, q, causal=True) == "flash (CPU kernel)"


def test_attention_backend_names_each_kind():
    cpu = torch.device("cpu")
    assert attention_backend("standard", cpu, torch.float32, 64, 2, 16, True).startswith("standard")
    assert attention_backend("tiled", cpu, torch.float32, 64, 2, 16, True).startswith("tiled")
    # a short CPU sequence takes the batched-GEMM path, a long one SDPA; dropout always SDPA
    assert attention_backend("flash", cpu, torch.float32, 64, 2, 16, True).startswith("matmul-softmax")
    assert attention_backend("flash", cpu, torch.float32, 8192, 2, 16, True).startswith("sdpa: ")
    assert attention_backend("flash", cpu, torch.float32, 64, 2, 16, True, dropout=0.1).startswith("sdpa: ")


def test_no_datasheet_peak_is_claimed_for_a_cpu():
    assert datasheet_peak(torch.device("cpu"), "bf16") is None
