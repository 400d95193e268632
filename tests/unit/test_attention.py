"""Tests for models.attention: kernel equivalence, masking and tiled memory use."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from models.ops import tiled_attention as tiled_mod
from models.ops.attention import KERNELS, attention, expand_rel_bias

BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Any:
    """Tiny tensors run faster on one thread than with intra-op fan-out."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

FAST_KERNELS = ("flash", "tiled")

# Shapes default to B=2, H=4, Hkv=4, Tq=Tk=37 (not a multiple of BLOCK), Dh=16.
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "causal": {"causal": True},
    "pad": {"pad": True},
    "causal_pad": {"causal": True, "pad": True},
    "bias": {"bias": True},
    "causal_bias_pad": {"causal": True, "bias": True, "pad": True},
    "gqa_causal": {"hkv": 2, "causal": True},
    "gqa_bias_pad": {"hkv": 2, "bias": True, "pad": True},
    "mqa_causal_bias": {"hkv": 1, "causal": True, "bias": True},
    "cross_gqa_bias_pad": {"tq": 19, "tk": 45, "hkv": 2, "bias": True, "pad": True},
    "aligned_causal_bias": {"tq": 32, "tk": 32, "causal": True, "bias": True},
}


def make_inputs(
    *, b: int = 2, h: int = 4, hkv: int = 4, tq: int = 37, tk: int | None = None,
    dh: int = 16, causal: bool = False, bias: bool = False, pad: bool = False,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> dict[str, Any]:
    """Random leaf tensors plus options for ``attention``."""
    tk = tq if tk is None else tk
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    kpm = None
    if pad:
        kpm = torch.ones(b, tk, dtype=torch.bool)
        kpm[0, -6:] = False  # right padding
        kpm[-1, :4] = False  # left padding: with causal, rows 0-3 see nothing
    return {
        "q": leaf(b, h, tq, dh), "k": leaf(b, hkv, tk, dh), "v": leaf(b, hkv, tk, dh),
        "rel_bias": leaf(h, tq + tk - 1) if bias else None,
        "key_padding_mask": kpm, "causal": causal,
    }


def run(inputs: dict[str, Any], kernel: str, block_size: int = BLOCK,
        grad_seed: int = 1) -> list[Tensor]:
    """Forward + backward with a fixed upstream gradient; returns out and all grads."""
    leaves = [inputs[n] for n in ("q", "k", "v", "rel_bias") if inputs[n] is not None]
    for t in leaves:
        t.grad = None
    out = attention(inputs["q"], inputs["k"], inputs["v"], kernel=kernel,
                    causal=inputs["causal"], rel_bias=inputs["rel_bias"],
                    key_padding_mask=inputs["key_padding_mask"], block_size=block_size)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def detached_copy(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Same values as fresh leaves in ``dtype``."""
    out = dict(inputs)
    for name in ("q", "k", "v", "rel_bias"):
        if inputs[name] is not None:
            out[name] = inputs[name].detach().to(dtype).requires_grad_()
    return out


def naive_reference(inputs: dict[str, Any]) -> Tensor:
    """Per-head attention written from the definitions, independent of the module."""
    q, k, v, rel = inputs["q"], inputs["k"], inputs["v"], inputs["rel_bias"]
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    kpm = inputs["key_padding_mask"]
    visible = torch.tensor([[not inputs["causal"] or j <= i for j in range(tk)] for i in range(tq)])
    offsets = torch.tensor([[j - i + tq - 1 for j in range(tk)] for i in range(tq)])
    heads = []
    for hh in range(h):
        kh, vh = k[:, hh // (h // hkv)], v[:, hh // (h // hkv)]
        s = q[:, hh] @ kh.transpose(-1, -2) / dh ** 0.5  # (B, Tq, Tk)
        if rel is not None:
            s = s + rel[hh][offsets]
        vis = visible[None] if kpm is None else visible[None] & kpm[:, None, :]
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # empty rows -> 0
        heads.append(p @ vh)
    return torch.stack(heads, dim=1)


def assert_all_close(actual: list[Tensor], expected: list[Tensor], tol: float) -> None:
    """Max error relative to max(1, max|expected|) is at most ``tol`` for each pair."""
    names = ["out", "dq", "dk", "dv", "drel"]
    assert len(actual) == len(expected)
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        err = (a.double() - e.double()).abs().max().item()
        scale = max(1.0, e.double().abs().max().item())
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_standard_matches_naive_reference_fp64(case: str) -> None:
    inputs = make_inputs(dtype=torch.float64, **CASES[case])
    expected = naive_reference(inputs)
    for kernel in KERNELS:
        got = attention(inputs["q"], inputs["k"], inputs["v"], kernel=kernel,
                        causal=inputs["causal"], rel_bias=inputs["rel_bias"],
                        key_padding_mask=inputs["key_padding_mask"], block_size=BLOCK)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=kernel)


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_outputs_and_grads_match_standard(case: str, kernel: str) -> None:
    inputs = make_inputs(**CASES[case])
    expected = run(inputs, "standard")
    assert_all_close(run(inputs, kernel), expected, tol=1e-5)


BF16_TOL = 3e-2  # bf16 has an 8-bit mantissa (~4e-3 relative per rounding)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["causal_bias_pad", "gqa_causal", "cross_gqa_bias_pad"])
def test_bf16_close_to_fp32_standard(case: str, kernel: str) -> None:
    inputs = make_inputs(dtype=torch.bfloat16, **CASES[case])
    # Reference: fp32 standard attention on the same bf16-rounded values.
    expected = run(detached_copy(inputs, torch.float32), "standard")
    got = run(inputs, kernel)
    assert got[0].dtype == torch.bfloat16
    assert_all_close([t.float() for t in got], expected, tol=BF16_TOL)


@pytest.mark.parametrize("block_size", [5, 16, 64])
def test_tiled_result_independent_of_block_size(block_size: int) -> None:
    inputs = make_inputs(causal=True, bias=True, pad=True, hkv=2)
    assert_all_close(run(inputs, "tiled", block_size=block_size), run(inputs, "standard"), 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_outputs_ignore_future_keys(kernel: str) -> None:
    inputs = make_inputs(causal=True, bias=True, hkv=2)
    t = 20
    base = run(inputs, kernel)[0]
    with torch.no_grad():
        for name in ("k", "v"):
            inputs[name][:, :, t + 1:] += 3.0
    moved = run(inputs, kernel)[0]
    torch.testing.assert_close(moved[:, :, : t + 1], base[:, :, : t + 1], atol=1e-6, rtol=1e-6)
    assert (moved[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-2  # perturbation is real


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_rows_are_zero_with_finite_grads(kernel: str, causal: bool) -> None:
    inputs = make_inputs(causal=causal, bias=True, pad=True, b=3)
    kpm = inputs["key_padding_mask"]
    kpm[1] = False  # batch 1 has no real key at all
    out, dq, dk, dv, drel = run(inputs, kernel)
    for t in (out, dq, dk, dv, drel):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    if causal:  # left padding of 4 keys leaves query rows 0-3 of the last batch empty
        assert (out[2, :, :4] == 0).all() and (dq[2, :, :4] == 0).all()
        assert (out[2, :, 4:].abs().amax(dim=-1) > 0).all()
    assert (out[0].abs().amax(dim=-1) > 0).all()  # rows with visible keys are not zeroed


def test_gqa_uses_consecutive_query_heads_per_kv_head() -> None:
    inputs = make_inputs(h=6, hkv=2, causal=True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    expected = attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
                         kernel="standard", causal=True)
    for kernel in KERNELS:
        got = attention(q, k, v, kernel=kernel, causal=True, block_size=BLOCK)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=kernel)


def test_expand_rel_bias_is_toeplitz_and_differentiable() -> None:
    tq, tk = 5, 7
    rel = torch.randn(3, tq + tk - 1, dtype=torch.float64, requires_grad=True)
    full = expand_rel_bias(rel, tq, tk)
    assert full.shape == (3, tq, tk)
    for i in range(tq):
        for j in range(tk):
            assert torch.equal(full[:, i, j], rel[:, j - i + tq - 1])
    assert torch.autograd.gradcheck(lambda r: expand_rel_bias(r, tq, tk), (rel,))


def test_tiled_rejects_dropout() -> None:
    inputs = make_inputs()
    with pytest.raises(ValueError, match="attention=tiled does not support attention dropout"):
        attention(inputs["q"], inputs["k"], inputs["v"], kernel="tiled", dropout_p=0.1)


@pytest.mark.parametrize("kernel", ["standard", "flash"])
def test_dropout_changes_output_and_stays_finite(kernel: str) -> None:
    inputs = make_inputs(causal=True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    clean = attention(q, k, v, kernel=kernel, causal=True)
    torch.manual_seed(0)
    dropped = attention(q, k, v, kernel=kernel, causal=True, dropout_p=0.5)
    assert torch.isfinite(dropped).all()
    assert (dropped - clean).abs().max() > 1e-3


def test_unknown_kernel_names_valid_ones() -> None:
    inputs = make_inputs()
    with pytest.raises(ValueError, match="standard, flash, tiled"):
        attention(inputs["q"], inputs["k"], inputs["v"], kernel="fused")


def test_bad_rel_bias_shape_rejected() -> None:
    inputs = make_inputs()
    with pytest.raises(ValueError, match="rel_bias"):
        attention(inputs["q"], inputs["k"], inputs["v"], kernel="standard",
                  rel_bias=torch.zeros(4, 37))


def max_saved_numel(inputs: dict[str, Any], kernel: str) -> int:
    """Largest tensor autograd saves for backward during one forward pass."""
    sizes: list[int] = []

    def pack(t: Tensor) -> Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention(inputs["q"], inputs["k"], inputs["v"], kernel=kernel,
                        causal=inputs["causal"], rel_bias=inputs["rel_bias"],
                        key_padding_mask=inputs["key_padding_mask"], block_size=BLOCK)
    out.sum().backward()  # the saved tensors are still usable
    return max(sizes)


def test_tiled_saves_no_quadratic_tensor() -> None:
    inputs = make_inputs(b=1, h=2, hkv=2, tq=128, dh=8, causal=True, bias=True, pad=True)
    b, h, t, dh = inputs["q"].shape
    assert max_saved_numel(inputs, "tiled") <= b * h * t * dh  # O(T), never (T, T)
    # The check is meaningful: the standard kernel saves (B, H, T, T) probabilities.
    assert max_saved_numel(inputs, "standard") >= b * h * t * t


@pytest.mark.parametrize(("tq", "tk", "causal", "tiles"), [
    (64, 64, True, 4 * 5 // 2),  # 4 blocks: only the lower triangle incl. diagonal
    (64, 64, False, 4 * 4),
    (37, 37, True, 3 * 4 // 2),  # ragged last block
    (19, 45, False, 2 * 3),
])
def test_tiled_computes_only_visible_tiles(tq: int, tk: int, causal: bool, tiles: int) -> None:
    inputs = make_inputs(tq=tq, tk=tk, causal=causal)
    tiled_mod.reset_block_counts()
    run(inputs, "tiled")
    assert tiled_mod.BLOCK_COUNTS == {"forward": tiles, "backward": tiles}


def test_tiled_keeps_rows_whose_first_key_block_is_masked() -> None:
    # Scores far below 0 after a fully padded first block must not underflow to an empty row.
    # float64: at |score| ~ 1000 fp32 rounding alone exceeds a 1e-5 tolerance.
    inputs = make_inputs(b=1, causal=False, bias=True, dtype=torch.float64)
    with torch.no_grad():
        inputs["rel_bias"].fill_(-1000.0)  # exp(-1000) underflows even in fp64
    kpm = torch.ones(1, 37, dtype=torch.bool)
    kpm[0, :BLOCK] = False
    inputs["key_padding_mask"] = kpm
    expected = run(inputs, "standard")
    assert expected[0].abs().amax() > 1e-2
    assert_all_close(run(inputs, "tiled"), expected, tol=1e-10)


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_non_contiguous_inputs(kernel: str) -> None:
    # Heads split out of a fused projection arrive as strided views.
    b, t, h, hkv, dh = 2, 37, 4, 2, 16
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(b, t, (h + 2 * hkv) * dh, generator=g, requires_grad=True)
    q, k, v = fused.split([h * dh, hkv * dh, hkv * dh], dim=-1)
    q = q.view(b, t, h, dh).transpose(1, 2)  # (B, H, T, Dh)
    k = k.view(b, t, hkv, dh).transpose(1, 2)  # (B, Hkv, T, Dh)
    v = v.view(b, t, hkv, dh).transpose(1, 2)
    grads = []
    for name in ("standard", kernel):
        fused.grad = None
        out = attention(q, k, v, kernel=name, causal=True, block_size=BLOCK)
        out.sum().backward()
        grads.append((out.detach(), fused.grad.clone()))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


MASK_FREE_BF16 = {"plain": {}, "causal": {"causal": True}, "gqa_causal": {"hkv": 2, "causal": True},
                  "mqa_causal": {"hkv": 1, "causal": True}, "cross": {"tq": 19, "tk": 45},
                  "cross_causal": {"tq": 19, "tk": 45, "causal": True}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [8, 128])
@pytest.mark.parametrize("case", list(MASK_FREE_BF16))
def test_short_flash_takes_the_matmul_softmax_path(case: str, block: int, dtype: torch.dtype,
                                                   monkeypatch) -> None:
    """Mask-free short attention on CPU runs as batched GEMMs + softmax (faster than SDPA's CPU
    kernel there), causal rows in query blocks that skip the keys they cannot see (block 8 splits
    T=37 into 5 blocks, the last one ragged; 128 is one block); it matches fp32 standard attention
    (outputs and the q/k/v grads; top-left causal alignment as SDPA's is_causal) to bf16 precision
    in bf16 and to 1e-5 in fp32, and future keys never reach a causal row."""
    import models.ops.attention as attn_mod

    calls = []
    real = attn_mod._MatmulSoftmax.apply
    monkeypatch.setattr(attn_mod._MatmulSoftmax, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(attn_mod, "CAUSAL_QUERY_BLOCK", block)
    monkeypatch.setattr(attn_mod, "MATMUL_SOFTMAX_MAX_SCORES", {(dtype, c): 64 * 64 for c in (True, False)})
    inputs = make_inputs(dtype=dtype, **MASK_FREE_BF16[case])
    expected = run(detached_copy(inputs, torch.float32), "standard")
    got = run(inputs, "flash")
    assert calls == [block] and got[0].dtype == dtype
    assert_all_close([t.float() for t in got], expected, tol=BF16_TOL if dtype == torch.bfloat16 else 1e-5)
    if inputs["causal"]:
        t = 10
        with torch.no_grad():
            for name in ("k", "v"):
                inputs[name][:, :, t + 1:] += 3.0
        moved = run(inputs, "flash")[0]
        torch.testing.assert_close(moved[:, :, : t + 1], got[0][:, :, : t + 1], atol=0, rtol=0)


def test_causal_query_blocks_cover_exactly_the_visible_keys() -> None:
    """Block i of a causal product multiplies queries [s, e) by keys [0, min(e, Tk)) only: every
    query appears once, and no block drops a key its last query can see."""
    from models.ops.attention import _query_blocks

    for tq, tk, block in [(256, 256, 128), (37, 37, 8), (19, 45, 8), (45, 19, 8), (5, 5, 128)]:
        blocks = _query_blocks(tq, tk, True, block)
        assert [s for s, _, _ in blocks] == list(range(0, tq, block))
        assert blocks[-1][1] == tq and all(e - s <= block for s, e, _ in blocks)
        assert all(seen == min(e, tk) for s, e, seen in blocks)  # the last row, e - 1, sees keys <= e - 1
    assert _query_blocks(37, 45, False, 8) == [(0, 37, 45)]
    # Work skipped: at T=256 in blocks of 128 the scores hold 3/4 of the full T x T product.
    assert sum((e - s) * seen for s, e, seen in _query_blocks(256, 256, True, 128)) == 256 * 256 * 3 // 4


def test_matmul_softmax_only_where_it_beats_sdpa() -> None:
    from models.ops.attention import MATMUL_SOFTMAX_MAX_SCORES, _use_matmul_softmax

    def qk(t: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.zeros(1, 1, t, 8, dtype=dtype), torch.zeros(1, 1, t, 8, dtype=dtype)

    for (dtype, causal), limit in MATMUL_SOFTMAX_MAX_SCORES.items():
        side = int(limit ** 0.5)
        assert _use_matmul_softmax(*qk(side, dtype), 0.0, causal)
        assert not _use_matmul_softmax(*qk(side + 1, dtype), 0.0, causal)  # long: SDPA (O(T) memory)
        assert not _use_matmul_softmax(*qk(64, dtype), 0.1, causal)  # dropout: SDPA's
    assert MATMUL_SOFTMAX_MAX_SCORES[(torch.float32, False)] < MATMUL_SOFTMAX_MAX_SCORES[(torch.float32, True)]
    assert not _use_matmul_softmax(*qk(64, torch.float16), 0.0, True)  # no native fp16 GEMM measured
