"""Tests for models.norm: formulas, nn reference equality, and mask handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.norm import NORMS, build_norm

D = 6


def _ref_bn(bn: nn.Module) -> nn.BatchNorm1d:
    """An nn.BatchNorm1d with the same affine parameters as ``bn``."""
    ref = nn.BatchNorm1d(D, eps=bn.eps, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(bn.weight)
        ref.bias.copy_(bn.bias)
    return ref


def _randomise_affine(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = build_norm("rmsnorm", D, eps=1e-6)
    _randomise_affine(norm)
    x = torch.randn(2, 5, D) * 3
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_layernorm_matches_nn() -> None:
    torch.manual_seed(1)
    norm = build_norm("layernorm", D)
    _randomise_affine(norm)
    ref = nn.LayerNorm(D)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(3, 4, D)
    mask = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(norm(x, mask), ref(x))


def test_batchnorm_equals_nn_without_padding() -> None:
    torch.manual_seed(2)
    bn = build_norm("batchnorm", D)
    _randomise_affine(bn)
    ref = _ref_bn(bn)
    for step in range(3):
        x = torch.randn(4, 7, D) * 2 + 1
        xr = x.detach().clone().requires_grad_(True)
        x.requires_grad_(True)
        mask = None if step == 0 else torch.ones(4, 7, dtype=torch.bool)
        out = bn(x, mask)
        expected = ref(xr.transpose(1, 2)).transpose(1, 2)  # (B, D, T) is BatchNorm1d's layout
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    bn.eval()
    ref.eval()
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(bn(x), ref(x.transpose(1, 2)).transpose(1, 2))


def test_batchnorm_ignores_padding() -> None:
    torch.manual_seed(3)
    bn_plain = build_norm("batchnorm", D)
    bn_pad = build_norm("batchnorm", D)
    x = torch.randn(3, 5, D)
    lengths = torch.tensor([5, 2, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]  # (B, T) ragged
    # Same real tokens, three extra padded positions; every padded slot holds garbage.
    mask_pad = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)  # (B, T + 3)
    x_pad = torch.cat([x, torch.zeros(3, 3, D)], dim=1)
    x_pad[~mask_pad] = 1e4
    x_pad[1, 6] = float("inf")
    x_pad[2, 7] = float("nan")
    out = bn_plain(x, mask)
    out_pad = bn_pad(x_pad, mask_pad)
    torch.testing.assert_close(out_pad[:, :5][mask], out[mask])
    assert torch.isfinite(out_pad).all()
    torch.testing.assert_close(bn_pad.running_mean, bn_plain.running_mean)
    torch.testing.assert_close(bn_pad.running_var, bn_plain.running_var)
    # And the statistics are those of the real tokens alone.
    ref = _ref_bn(bn_pad)
    torch.testing.assert_close(out[mask], ref(x[mask]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn_pad.running_var, ref.running_var)


def test_batchnorm_eval_uses_running_stats() -> None:
    bn = build_norm("batchnorm", D)
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
        bn.running_var.fill_(4.0)
    bn.eval()
    x = torch.randn(2, 3, D) + 5  # batch stats would be very different
    expected = (x - 2.0) / torch.sqrt(torch.tensor(4.0 + bn.eps))
    torch.testing.assert_close(bn(x), expected)
    torch.testing.assert_close(bn(x[:1]), expected[:1])  # independent of the rest of the batch
    assert bn.running_mean.eq(2.0).all()  # eval does not update


def test_batchnorm_skips_update_with_too_few_real_tokens() -> None:
    bn = build_norm("batchnorm", D)
    x = torch.randn(2, 3, D)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = True
    out = bn(x, mask)
    assert torch.isfinite(out).all()
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()


@pytest.mark.parametrize("kind", NORMS)
def test_bf16_inputs(kind: str) -> None:
    torch.manual_seed(4)
    norm = build_norm(kind, D)
    x = torch.randn(4, 8, D) * 3 + 1
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, 5:] = False
    ref = norm(x.bfloat16().float(), mask)
    out = norm(x.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[mask], ref[mask], atol=0.05, rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = norm(x.bfloat16(), mask)
    assert torch.isfinite(out_ac.float()).all()
    torch.testing.assert_close(out_ac.float()[mask], ref[mask], atol=0.05, rtol=0.02)


def test_unknown_norm_raises() -> None:
    with pytest.raises(ValueError, match="layernorm, rmsnorm, batchnorm"):
        build_norm("groupnorm", D)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_nonfinite_padding_never_reaches_a_gradient(training: bool) -> None:
    """inf/nan at padded positions: the same forward and the same gradients (weight, bias, real
    tokens) as zero padding, zero gradient at padded inputs; in training both equal
    nn.BatchNorm1d run on the real tokens alone."""
    torch.manual_seed(5)
    B, T = 3, 6
    x = torch.randn(B, T, D) * 2 + 0.5
    mask = torch.arange(T)[None, :] < torch.tensor([6, 2, 4])[:, None]  # (B, T) ragged
    g = torch.randn(B, T, D)  # upstream gradient, non-zero at padded positions too
    x_bad = x.masked_fill(~mask[..., None], 0.0)
    x_bad[1, 2:, :3] = float("inf")
    x_bad[1, 2:, 3:] = float("-inf")
    x_bad[2, 4:] = float("nan")
    x_clean = x.masked_fill(~mask[..., None], 0.0)

    def run(inp: torch.Tensor):
        bn = build_norm("batchnorm", D)
        torch.manual_seed(6)
        _randomise_affine(bn)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(D))
            bn.running_var.copy_(torch.rand(D) + 0.5)
        bn.train(training)
        inp = inp.clone().requires_grad_(True)
        out = bn(inp, mask)
        out.backward(g)
        return bn, out.detach(), inp.grad

    bn_c, out_c, gx_c = run(x_clean)
    bn_b, out_b, gx_b = run(x_bad)
    torch.testing.assert_close(out_b, out_c, rtol=0, atol=0)
    for grad in (gx_b, bn_b.weight.grad, bn_b.bias.grad):
        assert torch.isfinite(grad).all()
    assert gx_b[~mask].eq(0).all() and gx_c[~mask].eq(0).all()
    torch.testing.assert_close(gx_b, gx_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn_b.weight.grad, bn_c.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn_b.bias.grad, bn_c.bias.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn_b.running_mean, bn_c.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn_b.running_var, bn_c.running_var, rtol=0, atol=0)
    if training:  # the reference: nn.BatchNorm1d on the real tokens only, (N, D)
        ref = _ref_bn(bn_b)
        xr = x[mask].clone().requires_grad_(True)
        out_r = ref(xr)
        out_r.backward(g[mask])
        torch.testing.assert_close(out_b[mask], out_r.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx_b[mask], xr.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn_b.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn_b.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
