"""The int4 layer's CPU kernel operands (the tinygemm-packed weight and scale-and-zero) are converted
once and reused: outputs equal the dequantize + matmul path's, and follow the buffers when they change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.quantize.int4_linear import Int4WeightLinear, dequantize_int4, quantize_int4


def _reference(layer: Int4WeightLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_int4(layer.weight, layer.scale, layer.zero, torch.float32)
    return F.linear(x.float(), w, layer.bias)


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel in this torch")
def test_cached_kernel_operands_follow_the_weights():
    gen = torch.Generator().manual_seed(0)
    layer = Int4WeightLinear.from_float(nn.Linear(64, 32), 32)
    assert layer.fused(torch.device("cpu"), torch.bfloat16)
    x = torch.randn(5, 64, generator=gen).bfloat16()
    # bf16 activations and output: 64-term sums of O(1) products, rounded to bf16 (8 bits): ~1e-2.
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), _reference(layer, x), rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(layer(x).float(), _reference(layer, x), rtol=2e-2, atol=5e-2)  # cached
        packed, scale, zero = quantize_int4(torch.randn(32, 64, generator=gen) * 3, 32)
        layer.weight.copy_(packed), layer.scale.copy_(scale), layer.zero.copy_(zero)  # new weights, same storage
        torch.testing.assert_close(layer(x).float(), _reference(layer, x), rtol=2e-2, atol=5e-2 * 3)
