"""Tests for models.position: each scheme's defining property."""

from __future__ import annotations

import math

import pytest
import torch

from models.position import POSITIONS, alibi_slopes, build_position, rel_bias_matrix, relative_position_bucket


def _build(kind: str, **overrides: object):
    kw: dict = dict(d_model=16, num_heads=4, head_dim=8, max_len=32, causal=False)
    kw.update(overrides)
    return build_position(kind, **kw)


# ---------------------------------------------------------------- rope


def test_rope_scores_depend_only_on_relative_offset() -> None:
    torch.manual_seed(0)
    rope = _build("rope", head_dim=16)
    q = torch.randn(2, 4, 10, 16)
    k = torch.randn(2, 4, 10, 16)
    q0, k0 = rope.rotate(q, k)
    qs, ks = rope.rotate(q, k, offset=37)  # every position shifted by 37, beyond the 32-long cache
    scores0 = q0 @ k0.transpose(-1, -2)  # (B, H, T, T)
    scores_s = qs @ ks.transpose(-1, -2)
    torch.testing.assert_close(scores0, scores_s, atol=1e-4, rtol=1e-4)
    # And the rotation is not a no-op.
    assert not torch.allclose(scores0, q @ k.transpose(-1, -2), atol=1e-3)


def test_rope_same_vectors_give_toeplitz_scores() -> None:
    torch.manual_seed(1)
    rope = _build("rope", head_dim=8)
    t = 12
    q = torch.randn(8).expand(1, 1, t, 8).contiguous()
    k = torch.randn(8).expand(1, 1, t, 8).contiguous()
    qr, kr = rope.rotate(q, k)
    s = (qr @ kr.transpose(-1, -2))[0, 0]  # (T, T)
    for shift in (1, 3):
        torch.testing.assert_close(s[:-shift, :-shift], s[shift:, shift:], atol=1e-4, rtol=1e-4)


def test_rope_preserves_norms_and_dtype() -> None:
    torch.manual_seed(2)
    rope = _build("rope", head_dim=8)
    q = torch.randn(2, 4, 40, 8)
    k = torch.randn(2, 4, 40, 8)
    qr, kr = rope.rotate(q, k)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1))
    qb, kb = rope.rotate(q.bfloat16(), k.bfloat16())
    assert qb.dtype == kb.dtype == torch.bfloat16


def test_rope_matches_rotation_of_a_single_pair() -> None:
    # head_dim 2: one frequency (1.0), so position p rotates (x, y) by angle p.
    rope = _build("rope", head_dim=2)
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 5, 2)
    qr, _ = rope.rotate(q, q)
    p = torch.arange(5, dtype=torch.float32)
    torch.testing.assert_close(qr[0, 0], torch.stack([p.cos(), p.sin()], dim=-1))


def test_rope_gqa_shapes() -> None:
    rope = _build("rope", num_heads=8, head_dim=8)
    q = torch.randn(2, 8, 6, 8)
    k = torch.randn(2, 2, 6, 8)
    qr, kr = rope.rotate(q, k)
    assert qr.shape == q.shape and kr.shape == k.shape
    # Each kv head is rotated exactly as the same vector would be as a query.
    qk, _ = rope.rotate(k, k)
    torch.testing.assert_close(kr, qk)


def test_rope_rejects_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="even head_dim"):
        _build("rope", head_dim=7)


def test_rope_cache_survives_low_precision_cast() -> None:
    rope = _build("rope", head_dim=8)
    q = torch.randn(1, 1, 30, 8)
    ref, _ = rope.rotate(q, q)
    rope.to(torch.bfloat16)  # a model-wide cast would degrade a bf16 cos/sin cache
    out, _ = rope.rotate(q, q)
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------- alibi


def test_alibi_slopes_power_of_two_and_not() -> None:
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    # 12 heads: the 8-head slopes, then every other slope of the 16-head recipe.
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert alibi_slopes(12) == pytest.approx(expected)


def test_alibi_bias_symmetric_and_long() -> None:
    alibi = _build("alibi", num_heads=8, max_len=16)
    assert not list(alibi.parameters())
    t = 3000  # far beyond any training length
    out = alibi.rel_bias(t, t)
    assert out.shape == (8, 2 * t - 1) and out.dtype == torch.float32
    mat = rel_bias_matrix(alibi.rel_bias(50, 50), 50, 50)  # (H, T, T)
    torch.testing.assert_close(mat, mat.transpose(-1, -2))
    assert mat[0, 10, 3].item() == pytest.approx(-0.5 * 7)
    assert out[7, 0].item() == pytest.approx(-(2.0**-8) * (t - 1))
    assert torch.all(out[:, t - 1] == 0)


# ---------------------------------------------------------------- relative

_BIDIR = {0: 0, -1: 1, -7: 7, -8: 8, -15: 9, -16: 10, -32: 12, -64: 14, -127: 15, -128: 15, -5000: 15,
          1: 17, 7: 23, 8: 24, 16: 26, 32: 28, 64: 30, 128: 31, 5000: 31}
_CAUSAL = {0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -128: 31, -5000: 31, 1: 0, 9: 0}


@pytest.mark.parametrize("bidirectional,table", [(True, _BIDIR), (False, _CAUSAL)])
def test_relative_bucket_table(bidirectional: bool, table: dict[int, int]) -> None:
    rel = torch.tensor(list(table))
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert dict(zip(table, got.tolist())) == table


def test_relative_bias_shape_values_and_grad() -> None:
    rel = _build("relative", num_heads=4, causal=False)
    tq, tk = 5, 9
    out = rel.rel_bias(tq, tk)
    assert out.shape == (4, tq + tk - 1)
    # Column tq - 1 is offset 0 -> bucket 0; column 0 is offset -(tq - 1) = -4 -> bucket 4.
    torch.testing.assert_close(out[:, tq - 1], rel.emb.weight[0])
    torch.testing.assert_close(out[:, 0], rel.emb.weight[4])
    out.sum().backward()
    assert rel.emb.weight.grad is not None and rel.emb.weight.grad.abs().sum() > 0


def test_relative_works_for_long_sequences() -> None:
    rel = _build("relative", num_heads=4, causal=True, max_len=16)
    t = 4000
    out = rel.rel_bias(t, t)
    assert out.shape == (4, 2 * t - 1)
    torch.testing.assert_close(out[:, 0], rel.emb.weight[31])  # far past -> last bucket
    torch.testing.assert_close(out[:, -1], rel.emb.weight[0])  # future -> bucket 0 (masked anyway)


def test_rel_bias_matrix_indexing() -> None:
    out = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)  # tq=2, tk=5
    mat = rel_bias_matrix(out, 2, 5)
    assert mat.shape == (2, 2, 5)
    for i in range(2):
        for j in range(5):
            assert mat[1, i, j] == out[1, j - i + 1]


# ---------------------------------------------------------------- absolute


def test_learned_refuses_longer_sequences() -> None:
    pos = _build("learned", d_model=16, max_len=32)
    x = torch.zeros(2, 32, 16)
    assert pos.embed(x).shape == x.shape
    with pytest.raises(ValueError, match=r"at most 32 tokens but got 33"):
        pos.embed(torch.zeros(2, 33, 16))


def test_sinusoidal_formula_and_extension() -> None:
    d = 16
    pos = _build("sinusoidal", d_model=d, max_len=8)
    x = torch.zeros(1, 40, d)  # longer than the 8-long cache
    pe = pos.embed(x)[0]
    for p, i in [(0, 0), (3, 2), (7, 5), (39, 0), (39, 7)]:
        angle = p / 10000 ** (2 * i / d)
        assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # The offset path continues the same table.
    torch.testing.assert_close(pos.embed(torch.zeros(1, 4, d), offset=36)[0], pe[36:40])
    assert not list(pos.parameters())


# ---------------------------------------------------------------- shared


def test_identity_hooks() -> None:
    x = torch.randn(2, 5, 16)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    for kind in ("none", "relative", "alibi"):
        pos = _build(kind)
        assert pos.embed(x) is x
        assert pos.rotate(q, k) == (q, k)
    for kind in ("none", "sinusoidal", "learned", "rope"):
        assert _build(kind).rel_bias(5, 5) is None


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="valid: " + ", ".join(POSITIONS)):
        _build("absolute")
