"""Training objectives: turn packed token blocks into inputs/targets and compute summed losses.

Every objective returns (loss_sum, num_correct) over its predicted positions; the loop divides
by the global number of targets, known before any forward pass (`num_targets`), so the gradient
is the same however the batch is split across ranks and accumulation steps.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, ObjectiveConfig
from trainer.data.tokenizer import NUM_SENTINELS, PAD, ByteTokenizer

Batch = Dict[str, torch.Tensor]


class Objective:
    """Base class: `prepare` builds a batch from blocks, `loss` runs the model on it."""

    name = "base"
    rows_key = "x"  # the batch key whose first dim is the sample dim

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def num_targets(self, batch: Batch) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tokens(self, batch: Batch) -> int:
        """Input tokens processed (for tokens/s)."""
        return sum(v.numel() for k, v in batch.items() if k in ("x", "src", "tgt_in", "a", "b"))

    def num_target_bytes(self, batch: Batch) -> int | None:
        """UTF-8 bytes of the text the predicted targets stand for (None: bits/byte undefined)."""
        return None


class _Specials:
    """The tokenizer facts an objective needs: special ids, sentinels, bytes per id, regular ids."""

    def __init__(self, tokenizer=None):
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        self.pad, self.bos, self.eos, self.mask = tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id
        self.num_sentinels = tok.num_sentinels
        self.sentinels = np.array([tok.sentinel(i) for i in range(tok.num_sentinels)], dtype=np.int64)
        nbytes = tok.token_bytes()
        self.token_bytes = torch.from_numpy(np.asarray(nbytes, dtype=np.int64))
        special = np.zeros(len(nbytes), dtype=bool)
        special[[self.pad, self.bos, self.eos, self.mask, *self.sentinels.tolist()]] = True
        if isinstance(tok, ByteTokenizer):
            special[256:] = True  # every id above the bytes is special
        self.is_special = torch.from_numpy(special)
        self.regular = torch.from_numpy(np.flatnonzero(~special))  # ids MLM may substitute

    def count_bytes(self, targets: torch.Tensor) -> int:
        """Total UTF-8 bytes of `targets` (ids): specials count 0."""
        return int(self.token_bytes[targets.cpu()].sum())


def _ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()  # fp32 softmax: stable under bf16/fp16 autocast
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    correct = (logits.argmax(-1) == target).sum()
    return loss, correct


class CausalLM(Objective):
    """Next-token prediction (decoder)."""

    name = "clm"

    def __init__(self, tokenizer=None):
        self.sp = _Specials(tokenizer)

    def num_target_bytes(self, batch: Batch) -> int:
        """Bytes of the predicted next tokens `y` (BOS/EOS/PAD targets count 0)."""
        return self.sp.count_bytes(batch["y"])

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        return {"x": blocks[:, :-1], "y": blocks[:, 1:]}

    def num_targets(self, batch: Batch) -> int:
        return batch["y"].numel()

    def loss(self, model, batch):
        return _ce(model(batch["x"]), batch["y"])


class MaskedLM(Objective):
    """BERT-style masked LM: `mask_prob` of the non-special tokens predicted; of those 80% [MASK],
    10% a random non-special token, 10% kept (HF `DataCollatorForLanguageModeling`).

    Special ids (the tokenizer's PAD, BOS, EOS, MASK, sentinels; for the byte tokenizer every id
    >= 256) are never selected nor drawn as replacements, and no row is forced to have a target,
    so a row (or a whole batch) may have none: `num_targets` is the true count.
    """

    name = "mlm"

    def __init__(self, mask_prob: float, tokenizer=None):
        self.mask_prob = mask_prob
        self.sp = _Specials(tokenizer)

    def prepare(self, blocks: torch.Tensor, gen: torch.Generator) -> Batch:
        tokens = blocks[:, :-1]  # (B, T)
        special = self.sp.is_special[tokens]
        # Draws have the full (B, T) shape whatever the content, so `gen` advances the same per batch.
        sel = (torch.rand(tokens.shape, generator=gen) < self.mask_prob) & ~special
        action = torch.rand(tokens.shape, generator=gen)
        # A random regular id (byte tokenizer: ids 0..255, the same draws as a random byte).
        random_ids = self.sp.regular[torch.randint(0, len(self.sp.regular), tokens.shape, generator=gen)]
        x = torch.where(sel & (action < 0.8), torch.full_like(tokens, self.sp.mask), tokens)
        x = torch.where(sel & (action >= 0.8) & (action < 0.9), random_ids, x)
        return {"x": x, "sel": sel, "y": tokens}

    def num_target_bytes(self, batch: Batch) -> int:
        """Bytes of the original tokens at the predicted positions (`y[sel]`)."""
        return self.sp.count_bytes(batch["y"][batch["sel"]])

    def num_targets(self, batch: Batch) -> int:
        return int(batch["sel"].sum())  # may be 0: the caller guards the division

    def loss(self, model, batch):
        sel = batch["sel"]
        return _ce(model(batch["x"], select=sel), batch["y"][sel])  # head on the predicted rows only


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
        self.sp = _Specials(tokenizer)

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
        return _ce(model(batch["src"], target=batch["tgt_in"]), batch["tgt"])


def build_objective(kind: str, cfg: ObjectiveConfig, tokenizer=None) -> Objective:
    """Build the objective named `kind` (already resolved from `auto`); its special ids (MASK,
    sentinels, BOS/EOS) and bytes per id come from `tokenizer` (None: the byte tokenizer)."""
    if kind == "clm":
        return CausalLM(tokenizer)
    if kind == "mlm":
        return MaskedLM(cfg.mask_prob, tokenizer)
    if kind == "span":
        return SpanCorruption(cfg.noise_density, cfg.mean_span, tokenizer)
    if kind == "contrastive":
        from trainer.contrastive import Contrastive  # retrieval: pooling, global negatives, GradCache

        return Contrastive(cfg.temperature, cfg.pooling, PAD if tokenizer is None else tokenizer.pad_id)
    raise ConfigError(f"objective={kind!r} is not valid; choose one of: auto, clm, mlm, span, contrastive.")


def split_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every tensor in the batch (a rank's slice or a micro-batch)."""
    return {k: v[start:stop] for k, v in batch.items()}
