"""T5 span corruption (encoder-decoders; Raffel et al. 2020)."""
from __future__ import annotations

import numpy as np
import torch

from trainer.data.tokenizer import NUM_SENTINELS
from trainer.errors import ConfigError
from trainer.objectives.base import Batch, Objective, Specials, cross_entropy_sum


def _span_noise_mask(length: int, noise: int, spans: int, rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask: exactly `noise` noise tokens in `spans` spans, interleaved."""

    def segment(n: int, k: int) -> np.ndarray:  # random split of n items into k non-empty parts
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.zeros(0, int)
        return np.diff(np.concatenate([[0], cuts, [n]]))

    noise_lens, keep_lens = segment(noise, spans), segment(length - noise, spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, nz in zip(keep_lens, noise_lens):  # keep first so the sequence starts clean
        pos += keep
        mask[pos:pos + nz] = True
        pos += nz
    return mask


def _span_counts(length: int, noise_density: float, mean_span: float,
                 num_sentinels: int = NUM_SENTINELS) -> tuple[int, int]:
    """(noise tokens, noise spans) in `length` tokens, T5's formulas; ConfigError if too many spans."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    spans = max(1, min(round(noise / mean_span), noise, length - noise))
    if spans > num_sentinels:
        raise ConfigError(f"objective.mean_span={mean_span} gives {spans} spans per sequence but "
                          f"only {num_sentinels} sentinels exist; raise objective.mean_span or lower data.seq_len.")
    return noise, spans


def span_lengths(seq_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(src_len, tgt_len) in tokens of a span-corrupted block of `seq_len` tokens.

    T5 (Raffel et al. 2020; `t5.data.preprocessors.span_corruption`): `noise = round(seq_len *
    noise_density)` tokens in `spans = round(noise / mean_span)` spans. The source keeps the
    `seq_len - noise` clean tokens, one sentinel per span and a final EOS; the target is
    `<s0> span0 <s1> span1 ... EOS`. So src_len = seq_len - noise + spans + 1 and
    tgt_len = noise + spans + 1 (`tgt_in` has tgt_len too). Fixed for a given seq_len.

    Raises:
        ConfigError: more spans than the vocabulary has sentinels.
    """
    noise, spans = _span_counts(seq_len, noise_density, mean_span)
    return seq_len - noise + spans + 1, noise + spans + 1


class SpanCorruption(Objective):
    """T5-style span corruption (`span_corruption` in t5.data.preprocessors): each noise span is
    replaced by one sentinel in the source (`tokenizer.sentinel(i)`; for the byte tokenizer
    VOCAB_SIZE - 1 - i), which ends with EOS; the target lists each sentinel followed by its span,
    then EOS. Lengths are fixed per block length (`span_lengths`), so no padding is needed."""

    name = "span"
    rows_key = "src"

    def __init__(self, noise_density: float, mean_span: float, tokenizer=None):
        self.noise_density, self.mean_span = noise_density, mean_span
        self.sp = Specials(tokenizer)

    def _counts(self, length: int) -> tuple[int, int]:
        return _span_counts(length, self.noise_density, self.mean_span, self.sp.num_sentinels)

    def num_target_bytes(self, batch: Batch) -> int:
        """Bytes of the target `tgt`: the corrupted spans' tokens (sentinels and EOS count 0)."""
        return self.sp.count_bytes(batch["tgt"])

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        tokens = blocks[:, :-1].numpy()
        B, L = tokens.shape
        noise, spans = self._counts(L)
        src_len, tgt_len = span_lengths(L, self.noise_density, self.mean_span)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        src = np.empty((B, src_len), dtype=np.int64)
        tgt = np.empty((B, tgt_len), dtype=np.int64)
        src[:, -1] = tgt[:, -1] = self.sp.eos  # T5 appends EOS to inputs and targets
        for b in range(B):
            mask = _span_noise_mask(L, noise, spans, rng)
            starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each span
            sentinel = self.sp.sentinels[np.maximum(np.cumsum(starts) - 1, 0)]  # span i -> sentinel(i)
            keep_src = ~mask | starts  # span starts become sentinels, rest of span dropped
            src[b, :-1] = np.where(starts, sentinel, tokens[b])[keep_src]
            noise_idx = np.flatnonzero(mask)
            pairs = np.stack([np.where(starts[noise_idx], sentinel[noise_idx], -1),
                              tokens[b][noise_idx]], 1).reshape(-1)  # (sentinel|-1, token) per noise token
            tgt[b, :-1] = pairs[pairs >= 0]
        src_t, tgt_t = torch.from_numpy(src), torch.from_numpy(tgt)
        tgt_in = torch.cat([torch.full((B, 1), self.sp.bos), tgt_t[:, :-1]], dim=1)  # teacher forcing
        return {"src": src_t, "tgt_in": tgt_in, "tgt": tgt_t}

    def num_targets(self, batch: Batch) -> int:
        return batch["tgt"].numel()

    def loss(self, model, batch):
        return cross_entropy_sum(model(batch["src"], target=batch["tgt_in"]), batch["tgt"], self.z_loss)
