"""Which tensors of a (quantized) model are in which format: the report's "tensor formats" table.

Every state_dict entry is put in a group (block linear weights, their biases, the token
embedding, an untied LM head, positions, norms, other) and described by its storage: a plain
dtype (`fp32`), or a torchao tensor subclass by its inner tensors (`Int8Tensor: int8 qdata + fp32
scale`), or the int4 fallback's packed bytes; MB are data bytes (`report.tensor_bytes`, 1e6 bytes).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.quantize import block_modules
from trainer.quantize.report import MB, tensor_bytes

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8",
          torch.uint8: "uint8", torch.int32: "int32", torch.int64: "int64"}


def _dtype(t: torch.Tensor) -> str:
    return DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def tensor_format(t: torch.Tensor, key: str = "") -> str:
    """`fp32`, `int4 packed (2 per uint8)` or, for a tensor subclass, `<Type>: <dtype> <inner> + ...`."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = " + ".join(f"{_dtype(getattr(t, n))} {n}" for n in names)
        return f"{type(t).__name__}: {inner}"
    if t.dtype == torch.uint8 and key.endswith(".weight"):
        return "int4 packed (2 per uint8)"
    if key.endswith((".scale", ".zero")):  # the int4 fallback's per-group scale and zero point
        return f"{_dtype(t)} {key.rsplit('.', 1)[1]}"
    return _dtype(t)


def _group(key: str, linears: tuple[str, ...]) -> str:
    if key.startswith(linears):
        return "block linear biases" if key.endswith(".bias") else "block linear weights"
    if key == "embed.weight":
        return "token embedding"
    if key.startswith("head."):
        return "LM head (untied)"
    if ".position." in f".{key}":
        return "positions"
    if "norm" in key:
        return "norms"
    return "other"


def tensor_formats(model: nn.Module) -> list[dict]:
    """[{group, format, mb, tensors}] of `model`'s state_dict, one row per group (formats of a group
    joined with "; "), in a fixed group order. A tied LM head has no row: it is the embedding."""
    linears = tuple(name + "." for name, *_ in block_modules(model))
    rows: dict[str, dict] = {}
    for key, t in model.state_dict().items():
        row = rows.setdefault(_group(key, linears), {"formats": [], "bytes": 0, "tensors": 0})
        fmt = tensor_format(t, key)
        if fmt not in row["formats"]:
            row["formats"].append(fmt)
        row["bytes"] += tensor_bytes(t)
        row["tensors"] += 1
    order = ["block linear weights", "block linear biases", "token embedding", "LM head (untied)", "positions",
             "norms", "other"]
    return [{"group": g, "format": "; ".join(rows[g]["formats"]), "mb": rows[g]["bytes"] / MB,
             "tensors": rows[g]["tensors"]} for g in order if g in rows]


def format_formats_table(rows: list[dict]) -> str:
    """A markdown table of `tensor_formats` rows (tensor group, format, MB)."""
    lines = ["| tensor group | format | MB | tensors |", "|---|---|---:|---:|"]
    lines += [f"| {r['group']} | {r['format']} | {r['mb']:.3f} | {r['tensors']} |" for r in rows]
    return "\n".join(lines)
