"""What a run reads: its corpus (token store, streamed text, or retrieval pairs) and its batches."""
from __future__ import annotations

import sys

import torch

from trainer.data import BatchStream, blocks_of, load_corpus
from trainer.data.pairs import load_pair_corpus, pair_tokenizer
from trainer.data.streaming import StreamingBatches, load_stream_corpus
from trainer.distributed import Dist


def load_run_corpus(cfg, d: Dist):
    """The corpus of run config `cfg` (`cfg.data.source` and `cfg.data.streaming` choose the reader).

    Under torchrun rank 0 builds the on-disk cache first and the others then open it.
    """
    if not d.is_main and d.world_size > 1:
        torch.distributed.barrier()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if d.is_main else (lambda m: None)
    if cfg.data.source == "pairs":
        corpus = load_pair_corpus(cfg.data, cfg.seed, pair_tokenizer(cfg.tokenizer, say))
    elif cfg.data.streaming:
        corpus = load_stream_corpus(cfg.data, cfg.seed, cfg.tokenizer,
                                    cfg.trainer.batch_size * cfg.trainer.eval_batches, say=say)
    else:
        corpus = load_corpus(cfg.data, cfg.seed, cfg.tokenizer, say=say)
    if d.is_main and d.world_size > 1:
        torch.distributed.barrier()
    return corpus


def build_batch_stream(cfg, corpus, d: Dist):
    """Training batches by step: from the memory-mapped store (fixed blocks, or windows at random
    offsets with data.random_offsets), or (data.streaming) from `datasets`."""
    if cfg.data.streaming:
        return StreamingBatches(cfg.data, cfg.seed, corpus.tokenizer, cfg.trainer.batch_size, d, corpus.skip_docs)
    return BatchStream(blocks_of(corpus, "train"), cfg.trainer.batch_size, cfg.seed,
                       random_offsets=random_offsets(cfg.data))


def random_offsets(data_cfg) -> bool:
    """Whether training windows start at random offsets: `data.random_offsets`, or when unset (auto)
    for every source read from the token store (not data=pairs, not data.streaming)."""
    if data_cfg.random_offsets is not None:
        return bool(data_cfg.random_offsets)
    return data_cfg.source != "pairs" and not data_cfg.streaming
