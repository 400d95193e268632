"""data.streaming=true: documents read through `datasets`' streaming mode (an IterableDataset), never
copied to disk or memory, tokenized and packed on the fly.

The held-out split is data.val_files (through the token store) when given; otherwise the first
documents of the stream, until they fill `trainer.batch_size x trainer.eval_batches` blocks, and
training starts at the document after them. Training documents are sharded across ranks
(`split_dataset_by_node`: rank r reads every world_size-th example); each rank packs its own
documents into blocks, and the ranks' rows are gathered into the global batch, rank 0's first,
so the loop slices it exactly as it slices a store batch.

The batch at step s is a pure function of (data, tokenizer, world size, s): a resumed run replays
the stream up to the step it resumes at (tokenizing, no model work) and continues with the same
example and the same token within it. When the stream ends it starts again (the next epoch).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.config.schema import DataConfig
from trainer.data import ByteTokenizer, Corpus
from trainer.data.sources import load_documents
from trainer.data.tokenizer import load_pretrained

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text",
             ".text": "text"}


def open_stream(cfg: DataConfig):
    """The documents of `cfg` as a streaming `datasets.IterableDataset` (nothing is downloaded or
    converted ahead). Text files are one document per file (`sample_by="document"`), read as UTF-8."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.source == "hub":
        try:
            return datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, streaming=True)
        except Exception as e:
            raise ConfigError(f"data.name={cfg.name!r} could not be streamed from the Hugging Face hub "
                              f"(offline, or no such dataset/split?): {type(e).__name__}.") from e
    files = [os.path.expanduser(str(f)) for f in cfg.files]
    exts = {os.path.splitext(f)[1].lower() for f in files}
    builder = _BUILDERS.get(exts.pop()) if len(exts) == 1 else None
    if builder is None:
        raise ConfigError(f"data.streaming=true reads data.files of one of the extensions "
                          f"{', '.join(sorted(_BUILDERS))}, all the same.")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


def _docs(ds, field: str) -> Iterator[bytes]:
    for row in ds:
        text = row.get(field)
        if text is None:
            raise ConfigError(f"data.text_field={field!r} is not a field of the streamed data; fields: "
                              f"{', '.join(row)}.")
        yield text.encode("utf-8") if isinstance(text, str) else bytes(text)


def pack_stream(docs: Iterator[bytes], tokenizer, width: int) -> Iterator[tuple[np.ndarray, int]]:
    """Continuous packing: (block of `width` int64 ids, documents begun so far) as blocks fill.

    Each non-empty document is BOS + ids + EOS; blocks run across document boundaries.
    """
    buf = np.zeros(0, np.int64)
    n_docs = 0
    for doc in docs:
        n_docs += 1
        if not doc:
            continue
        ids = tokenizer.encode_docs([doc])[0]
        buf = np.concatenate([buf, [tokenizer.bos_id], ids, [tokenizer.eos_id]])
        while len(buf) >= width:
            yield buf[:width], n_docs
            buf = buf[width:]


def held_out_head(cfg: DataConfig, tokenizer, num_blocks: int) -> tuple[torch.Tensor, int]:
    """(validation blocks, documents they used): the first documents of the stream, up to
    `num_blocks` blocks (the partial block after them is dropped)."""
    blocks, used = [], 0
    for block, used in pack_stream(_docs(open_stream(cfg), cfg.text_field), tokenizer, cfg.seq_len + 1):
        blocks.append(block)
        if len(blocks) >= num_blocks:
            break
    if len(blocks) < num_blocks:
        raise ConfigError(f"data: the streamed corpus is too small to hold out trainer.batch_size x "
                          f"trainer.eval_batches = {num_blocks} blocks of data.seq_len+1={cfg.seq_len + 1} tokens "
                          f"and train on the rest; add text, lower data.seq_len, or give data.val_files.")
    return torch.from_numpy(np.stack(blocks)), used


class StreamingBatches:
    """Training batches read from the stream: `batch(step)` -> (batch_size, seq_len + 1) int64.

    Sequential by design: asking for a step ahead of the stream replays the stream up to it (a
    resume), asking for an earlier one restarts it; the result is the same either way.
    """

    def __init__(self, cfg: DataConfig, seed: int, tokenizer, batch_size: int, dist, skip_docs: int = 0):
        self.cfg, self.seed, self.tokenizer, self.batch_size, self.dist = cfg, seed, tokenizer, batch_size, dist
        self.skip_docs = skip_docs
        self.per_rank = batch_size // dist.world_size
        self._blocks: Iterator[np.ndarray] | None = None
        self._next_step = 0

    def _rank_blocks(self) -> Iterator[np.ndarray]:
        from datasets.distributed import split_dataset_by_node

        epoch = 0
        while True:
            ds = open_stream(self.cfg).skip(self.skip_docs)
            if self.dist.world_size > 1:
                ds = split_dataset_by_node(ds, rank=self.dist.rank, world_size=self.dist.world_size)
            empty = True
            for block, _ in pack_stream(_docs(ds, self.cfg.text_field), self.tokenizer, self.cfg.seq_len + 1):
                empty = False
                yield block
            if empty:
                raise ConfigError("data: the streamed training documents hold no block of data.seq_len+1="
                                  f"{self.cfg.seq_len + 1} tokens for every rank; add text or lower data.seq_len.")
            epoch += 1

    def _local(self) -> torch.Tensor:
        rows = [next(self._blocks) for _ in range(self.per_rank)]
        return torch.from_numpy(np.stack(rows))  # (per_rank, width)

    def batch(self, step: int) -> torch.Tensor:
        """The global batch for optimizer step `step` (0-based): (batch_size, seq_len + 1) int64."""
        if self._blocks is None or step < self._next_step:
            self._blocks, self._next_step = self._rank_blocks(), 0
        while self._next_step < step:  # replay up to `step` (a resumed run)
            self._local()
            self._next_step += 1
        local = self._local()
        self._next_step += 1
        if self.dist.world_size == 1:
            return local
        if torch.distributed.get_backend() == "nccl":  # NCCL gathers device tensors only
            local = local.cuda()
        parts = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(parts, local)  # rank order: the loop slices rank r's rows back
        return torch.cat(parts).cpu()


def load_stream_corpus(cfg: DataConfig, seed: int, tok_cfg, num_val_blocks: int, say=print):
    """The `Corpus` of a streaming run: its tokenizer (byte or pretrained), its validation blocks
    (data.val_files whole, or the stream's first documents) and where training starts."""
    tokenizer = ByteTokenizer() if tok_cfg is None or tok_cfg.kind == "byte" else load_pretrained(tok_cfg.path, say=say)
    skip = 0
    if cfg.val_files:
        docs = load_documents(cfg, cfg.val_files, key="data.val_files")
        flat = (d for batch in docs.batches(list(range(len(docs)))) for d in batch)
        blocks = [b for b, _ in pack_stream(flat, tokenizer, cfg.seq_len + 1)]
        if not blocks:
            raise ConfigError(f"data.val_files hold no block of data.seq_len+1={cfg.seq_len + 1} tokens; add "
                              f"text to them or lower data.seq_len.")
        val = torch.from_numpy(np.stack(blocks))
    else:
        val, skip = held_out_head(cfg, tokenizer, num_val_blocks)
    return Corpus(train_blocks=None, val_blocks=val, num_docs=-1, num_tokens=0, tokenizer=tokenizer,
                  skip_docs=skip)
