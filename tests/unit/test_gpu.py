"""CUDA checks: skipped cleanly on machines without a GPU."""
from __future__ import annotations

import pytest
import torch

from models.ops.attention import attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kernel", ["flash", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_match_standard(kernel, dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    ref = attention(q, k, v, kernel="standard", causal=True)
    out = attention(q, k, v, kernel=kernel, causal=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    g_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-1, rtol=5e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_run_trains(make_cfg, tmp_path, precision):
    from trainer.run import run

    summary = run(make_cfg("trainer.device=cuda", f"precision={precision}", "trainer.max_steps=20",
                           "trainer.eval_every=20"), run_dir=str(tmp_path))
    assert summary["device"].startswith("cuda") and summary["eval/loss"] < 5.5
