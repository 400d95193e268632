"""`python -m trainer.embed run_dir=... input=... output=...`: texts -> L2-normalised vectors.

One vector per input line (.txt) or record (.jsonl, the `field` text), written as float32
(N, D) to `.npy`, or to `.parquet` with columns `row`, `text` and `embedding`. The encoder is the
run's, pooled as it was trained (`objective.pooling`), each text cut to the run's `data.seq_len`
tokens (BOS + text + EOS), batched by length, on `precision=fp32|bf16` and optionally a quantized
model (`quantize=<method>`: the run's `model_<method>.pt` from the quantization report when it
exists, otherwise quantized now with the same torchao transform).

    python -m trainer.embed run_dir=outputs/<date>/<time> input=docs.txt output=docs.npy
    python -m trainer.embed run_dir=... input=corpus.jsonl field=body output=vecs.parquet precision=bf16
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.cli import apply_quantization
from trainer.runs.artifacts import load_model
from trainer.retrieval.embedding import embed_rows
from trainer.data.pairs import encode_rows
from trainer.cli import compose_tool
from trainer.distributed import resolve_device
from trainer.cli import run_tool

TOOL = "embed"  # conf/tools/embed.yaml: every key, its default and its help line
INPUTS, OUTPUTS = (".txt", ".jsonl"), (".npy", ".parquet")

def read_texts(path: str, field: str) -> list[bytes]:
    """The texts of `path`: each line of a .txt (its newline removed), or `field` of each .jsonl record.

    Raises:
        ConfigError: missing file, other extension, bad JSON or a missing field (file and line named),
            or no text at all.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"input={path}: no such file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in INPUTS:
        raise ConfigError(f"input={path} must be one of {', '.join(INPUTS)} (one text per line, or a JSON record "
                          f"per line with a {field!r} field).")
    texts: list[bytes] = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n") if ext == ".txt" else line.strip()
            if ext == ".txt":
                texts.append(line)
                continue
            if not line:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"input={path}: line {n} is not valid JSON.") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError(f"input={path}: line {n} has no text field {field!r}; set field=<name>.")
            texts.append(record[field].encode("utf-8"))
    if not texts:
        raise ConfigError(f"input={path} is empty: there is nothing to embed.")
    return texts

def load_encoder(run_dir: str, device: torch.device, quantize: str = "none"):
    """(model in eval mode, tokenizer, config) of an encoder run, quantized with `quantize` if asked
    (the run's `model_<method>.pt` from the quantization report when it exists).

    Raises:
        ConfigError: not a run, not an encoder, or a quantization that cannot be applied.
    """

    model, tokenizer, cfg = load_model(run_dir, device)
    if cfg.model.arch != "encoder":
        raise ConfigError(f"run_dir={run_dir} holds a model={cfg.model.arch} run; trainer.embed needs a "
                          f"model=encoder run (trained with objective=contrastive, or mlm).")
    saved = os.path.join(run_dir, f"model_{quantize}.pt")
    return apply_quantization(model, cfg, quantize, device, saved=saved), tokenizer, cfg

@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer, texts: list[bytes], seq_len: int, pooling: str,
                batch_size: int = 64, device: torch.device | str = "cpu", precision: str = "fp32",
                progress: bool = False) -> np.ndarray:
    """L2-normalised embeddings (N, D) float32 of `texts`, in input order.

    Texts are encoded as BOS + tokens + EOS (cut to `seq_len`), sorted by length so each batch
    pads little, embedded `batch_size` at a time with `trainer.contrastive.embed`'s pooling.
    """
    from tqdm import tqdm

    device = torch.device(device)
    rows = encode_rows(texts, tokenizer, seq_len)  # (N, L)
    order = torch.argsort((rows != tokenizer.pad_id).sum(1), descending=True, stable=True)
    chunks = []
    bar = tqdm(total=len(texts), unit="text", disable=not progress, file=sys.stderr)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        chunks.append(embed_rows(model, rows[idx], tokenizer.pad_id, pooling, batch_size, device, precision))
        bar.update(len(idx))
    bar.close()
    out = torch.empty(len(texts), chunks[0].shape[1]) if chunks else torch.zeros(0, 0)
    if chunks:
        out[order] = torch.cat(chunks)
    return out.numpy().astype(np.float32)

def write_vectors(path: str, vectors: np.ndarray, texts: list[bytes]) -> None:
    """`.npy` (N, D) float32, or `.parquet` with row, text and embedding columns; atomically."""
    tmp = path + ".tmp" + os.path.splitext(path)[1]
    if path.endswith(".npy"):
        np.save(tmp, vectors)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"row": pa.array(np.arange(len(texts)), pa.int64()),
                          "text": pa.array([t.decode("utf-8", errors="replace") for t in texts], pa.large_string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                                                         vectors.shape[1])})
        pq.write_table(table, tmp)
    os.replace(tmp, path)

def run_embed(argv: list[str]) -> dict:
    """Compose `conf/tools/embed.yaml` with `argv`, load, embed, write; returns {output, rows, dim,
    precision, quantize}. Raises ConfigError on bad input, before anything is written."""

    a, _ = compose_tool(TOOL, argv)
    for key in ("run_dir", "input", "output"):
        if not a[key]:
            raise ConfigError(f"{key}=... is required: python -m trainer.embed run_dir=<run> input=<file.txt|.jsonl> "
                              f"output=<file.npy|.parquet>.")
    if os.path.splitext(a.output)[1].lower() not in OUTPUTS:
        raise ConfigError(f"output={a.output} must end in {' or '.join(OUTPUTS)}.")
    if a.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={a.precision} is not valid; choose fp32 or bf16.")
    if a.batch_size < 1:
        raise ConfigError(f"batch_size={a.batch_size} is out of range; it must be >= 1.")
    device = resolve_device(a.device)
    run_dir = os.path.abspath(os.path.expanduser(a.run_dir))
    texts = read_texts(os.path.expanduser(a.input), a.field)
    model, tokenizer, cfg = load_encoder(run_dir, device, a.quantize)
    vectors = embed_texts(model, tokenizer, texts, cfg.data.seq_len, cfg.objective.pooling, a.batch_size, device,
                          a.precision, progress=a.progress)
    out = os.path.abspath(os.path.expanduser(a.output))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_vectors(out, vectors, texts)
    print(f"{len(texts)} vectors of dimension {vectors.shape[1]} written to {out}", file=sys.stderr)
    return {"output": out, "rows": len(texts), "dim": int(vectors.shape[1]), "precision": a.precision,
            "quantize": a.quantize}

def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence;
    `--help` prints every key)."""

    return run_tool(TOOL, run_embed, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
