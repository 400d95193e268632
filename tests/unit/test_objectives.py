"""Tests for trainer.objectives: MLM (BERT / HF DataCollatorForLanguageModeling) and span
corruption (T5 `span_corruption`) checked against their reference definitions on real blocks.

Statistical checks use fixed generator seeds and 5-sigma binomial tolerances, so they are exact
reruns, never flaky, yet tight enough to catch a wrong rate.
"""
from __future__ import annotations

import functools
import math
import os
import random
import sysconfig

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.config.schema import ObjectiveConfig
from trainer.data import BOS, EOS, MASK, NUM_SENTINELS, PAD, VOCAB_SIZE
from trainer.objectives import MaskedLM, SpanCorruption, build_objective, span_lengths

_FILES = ("argparse.py", "textwrap.py", "os.py", "json/decoder.py", "string.py")


@functools.lru_cache(maxsize=1)
def _packed_stream() -> np.ndarray:
    """Documents packed as trainer/data.py does: BOS + utf-8 bytes + EOS per document, concatenated."""
    root = sysconfig.get_paths()["stdlib"]
    docs = [open(os.path.join(root, f), encoding="utf-8").read() for f in _FILES]
    docs += ["naïve café — ünïcode ✓ 数据\n" * 40, "x", "short doc\n"]
    parts = []
    for text in docs:
        parts += [[BOS], list(text.encode("utf-8")), [EOS]]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def _blocks(seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """Rows of `seq_len + 1` tokens (the extra one is the next-token target, as in the corpus)."""
    flat = _packed_stream()
    n = len(flat) // (seq_len + 1)
    if max_rows:
        n = min(n, max_rows)
    return torch.from_numpy(flat[: n * (seq_len + 1)].reshape(n, seq_len + 1).copy())


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """`count` successes of `n` trials is within `sigmas` binomial standard deviations of `p`."""
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _assert_rng_unchanged(before) -> None:
    after = _rng_states()
    assert torch.equal(before[0], after[0]), "the global torch RNG was used"
    assert np.array_equal(before[1], after[1]), "the global numpy RNG was used"
    assert before[2] == after[2], "the global python RNG was used"


# --------------------------------------------------------------------------- MLM


def _mlm_blocks() -> torch.Tensor:
    """Real text blocks (bytes, BOS, EOS) with every other special id sprinkled in too."""
    blocks = _blocks(128)
    g = torch.Generator().manual_seed(11)
    where = torch.rand(blocks.shape, generator=g) < 0.03
    specials = torch.randint(256, VOCAB_SIZE, blocks.shape, generator=g)
    blocks = torch.where(where, specials, blocks)
    present = set(blocks.unique().tolist())
    assert {PAD, BOS, EOS, MASK, VOCAB_SIZE - 1} <= present
    return blocks


@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_mlm_matches_bert_recipe(mask_prob: float) -> None:
    blocks = _mlm_blocks()
    tokens = blocks[:, :-1]
    batch = MaskedLM(mask_prob).prepare(blocks, torch.Generator().manual_seed(123))
    x, sel, y = batch["x"], batch["sel"], batch["y"]
    special = tokens >= 256
    assert torch.equal(y, tokens)
    assert sel.dtype == torch.bool and sel.shape == tokens.shape
    # Never a special id (PAD, BOS, EOS, MASK, sentinels) as a target.
    assert not (sel & special).any()
    assert special.sum() > 0.02 * special.numel()  # the check above is not vacuous
    # mask_prob of the non-special tokens, independently of position.
    n_real = int((~special).sum())
    assert n_real > 150_000
    assert _within(int(sel.sum()), n_real, mask_prob)
    assert MaskedLM(mask_prob).num_targets(batch) == int(sel.sum())
    # Unselected positions are the input, exactly (special ids included).
    assert torch.equal(x[~sel], tokens[~sel])
    # Of the selected: 80% [MASK], 10% random byte, 10% kept (a random byte equals the original 1/256).
    xs, ys = x[sel], tokens[sel]
    n_sel = len(xs)
    is_mask = xs == MASK
    changed_byte = ~is_mask & (xs != ys)
    kept = xs == ys
    assert _within(int(is_mask.sum()), n_sel, 0.8)
    assert _within(int(changed_byte.sum()), n_sel, 0.1 * 255 / 256)
    assert _within(int(kept.sum()), n_sel, 0.1 + 0.1 / 256)
    assert int(is_mask.sum() + changed_byte.sum() + kept.sum()) == n_sel
    # Random replacements are bytes 0..255, spread over the whole byte range.
    rand_vals = xs[~is_mask]
    assert rand_vals.min() >= 0 and rand_vals.max() <= 255
    assert len(xs[changed_byte].unique()) >= 250


def test_mlm_position_zero_is_not_forced() -> None:
    """BERT never forces a target: position 0 (usually BOS) is selected at the same rate as any
    other byte, and rows may have no target at all."""
    g = torch.Generator().manual_seed(5)
    B, T = 4000, 8
    byte_rows = torch.randint(0, 256, (B, T + 1), generator=g)
    mask_prob = 0.15
    batch = MaskedLM(mask_prob).prepare(byte_rows, torch.Generator().manual_seed(6))
    sel = batch["sel"]
    assert not sel.any(dim=1).all()  # some rows have no target (0.85**8 = 27% expected)
    assert _within(int(sel[:, 0].sum()), B, mask_prob)
    assert _within(int((~sel.any(dim=1)).sum()), B, (1 - mask_prob) ** T)
    # Rows made only of special ids (BOS first, as in the corpus) get no target at all.
    specials = torch.tensor([BOS, EOS, PAD, MASK, VOCAB_SIZE - 1, VOCAB_SIZE - NUM_SENTINELS, BOS, EOS, PAD])
    rows = specials.repeat(64, 1)
    batch = MaskedLM(0.9).prepare(rows, torch.Generator().manual_seed(7))
    assert not batch["sel"].any()
    assert MaskedLM(0.9).num_targets(batch) == 0
    assert torch.equal(batch["x"], rows[:, :-1])


def test_mlm_uses_only_its_generator() -> None:
    blocks = _mlm_blocks()[:64]
    mlm = build_objective("mlm", ObjectiveConfig(mask_prob=0.15))
    torch.manual_seed(0)
    before = _rng_states()
    a = mlm.prepare(blocks, torch.Generator().manual_seed(42))
    b = mlm.prepare(blocks, torch.Generator().manual_seed(42))
    c = mlm.prepare(blocks, torch.Generator().manual_seed(43))
    _assert_rng_unchanged(before)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sel"], c["sel"])


# --------------------------------------------------------------------------- span corruption

SPAN_CASES = [(24, 0.15, 3.0), (128, 0.15, 3.0), (512, 0.15, 3.0), (100, 0.5, 2.0), (64, 0.3, 1.0),
              (40, 0.15, 8.0), (256, 0.25, 2.5)]


def _t5_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5 random_spans_noise_mask: num_noise_tokens and num_noise_spans."""
    noise = int(np.round(length * noise_density))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(np.round(noise / mean_span)), 1)
    return noise, spans


def _sentinel(i: int) -> int:
    """T5: <extra_id_i> counts down from the last id of the vocabulary."""
    return VOCAB_SIZE - 1 - i


@pytest.mark.parametrize("seq_len,density,mean_span", SPAN_CASES)
def test_span_corruption_matches_t5(seq_len: int, density: float, mean_span: float) -> None:
    blocks = _blocks(seq_len, max_rows=48)
    obj = SpanCorruption(density, mean_span)
    batch = obj.prepare(blocks, torch.Generator().manual_seed(seq_len))
    src, tgt, tgt_in = batch["src"], batch["tgt"], batch["tgt_in"]
    noise, spans = _t5_counts(seq_len, density, mean_span)
    assert spans <= NUM_SENTINELS and spans <= seq_len - noise
    B = blocks.shape[0]
    assert src.shape == (B, seq_len - noise + spans + 1) and tgt.shape == (B, noise + spans + 1)
    assert span_lengths(seq_len, density, mean_span) == (src.shape[1], tgt.shape[1])
    assert tgt_in.shape == tgt.shape
    assert torch.equal(tgt_in[:, 0], torch.full((B,), BOS)) and torch.equal(tgt_in[:, 1:], tgt[:, :-1])
    assert obj.num_targets(batch) == tgt.numel()
    expected_sentinels = [_sentinel(i) for i in range(spans)]
    is_sent = lambda t: t >= VOCAB_SIZE - NUM_SENTINELS  # noqa: E731 (text blocks hold no sentinels)
    masks = []
    for b in range(B):
        s, t, orig = src[b].tolist(), tgt[b].tolist(), blocks[b, :-1].tolist()
        assert s[-1] == EOS and t[-1] == EOS  # T5 appends EOS to inputs and targets
        s, t = s[:-1], t[:-1]
        # Exactly one sentinel per span, counting down from VOCAB_SIZE - 1, in src and tgt alike.
        assert [v for v in s if is_sent(v)] == expected_sentinels
        assert [v for v in t if is_sent(v)] == expected_sentinels
        # T5's mask starts with clean tokens and ends with noise; spans and gaps are non-empty.
        assert not is_sent(s[0]) and is_sent(t[0])
        assert not any(is_sent(u) and is_sent(v) for u, v in zip(s, s[1:]))
        assert not any(is_sent(u) and is_sent(v) for u, v in zip(t, t[1:]))
        # Spans from the target, keyed by their sentinel.
        span_of, cur = {}, None
        for v in t:
            if is_sent(v):
                cur = span_of.setdefault(v, [])
            else:
                cur.append(v)
        assert sum(map(len, span_of.values())) == noise
        # Exact reconstruction: each sentinel in src replaced by its span gives the block back.
        rebuilt, mask = [], []
        for v in s:
            rebuilt += span_of[v] if is_sent(v) else [v]
            mask += [True] * len(span_of[v]) if is_sent(v) else [False]
        assert rebuilt == orig
        assert mask[-1]  # the last token is noise (T5's interleaving ends with a noise span)
        masks.append(mask)
    if spans > 1:  # random span layout (one span is always the tail in T5 without random_roll)
        assert len({tuple(m) for m in masks}) > 1


def test_span_uses_only_its_generator() -> None:
    blocks = _blocks(64, max_rows=16)
    span = build_objective("span", ObjectiveConfig(noise_density=0.15, mean_span=3.0))
    torch.manual_seed(0)
    before = _rng_states()
    a = span.prepare(blocks, torch.Generator().manual_seed(9))
    b = span.prepare(blocks, torch.Generator().manual_seed(9))
    c = span.prepare(blocks, torch.Generator().manual_seed(10))
    _assert_rng_unchanged(before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["src"], c["src"])


def test_span_lengths_reference_values_and_errors() -> None:
    # T5's default (noise_density 0.15, mean span 3) on 512 tokens: 77 noise tokens in 26 spans.
    assert span_lengths(512, 0.15, 3.0) == (512 - 77 + 26 + 1, 77 + 26 + 1)
    assert span_lengths(128, 0.15, 3.0) == (128 - 19 + 6 + 1, 19 + 6 + 1)
    assert span_lengths(24, 0.15, 3.0) == (24 - 4 + 1 + 1, 4 + 1 + 1)
    # More spans than sentinels: one clear ConfigError, from span_lengths and from prepare.
    with pytest.raises(ConfigError, match="sentinels"):
        span_lengths(4096, 0.5, 1.0)
    with pytest.raises(ConfigError, match="objective.mean_span"):
        SpanCorruption(0.5, 1.0).prepare(torch.zeros(2, 4097, dtype=torch.long), torch.Generator())
