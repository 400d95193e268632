"""Quantization on torchao: post-training methods, QAT, and the size/latency/quality report.

The nn.Linear layers inside the transformer blocks (nearly all FLOPs) are quantized, and with
`quantize.embeddings` (default: on for encoders) the token embedding too, to int8 weight-only
(`embedding.py`); norms, positions, biases and a decoder's LM head stay full precision.
`formats.py` says which tensors end up in which format.
dynamic_int8 / weight_int8: torchao's Int8DynamicActivationInt8WeightConfig / Int8WeightOnlyConfig.
weight_int4: torchao's Int4WeightOnlyConfig where it has a kernel (CUDA + mslk), else the fallback
trainer.qlinear.Int4WeightLinear. qat_int8: torchao.quantization.qat fake quantization in training,
converted at the end. report.py measures; __main__.py quantizes a finished run.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from models.blocks import Block
from trainer.errors import ConfigError
from trainer.data.tokenizer import VOCAB_SIZE
from trainer.runs.model import build_run_model, model_with_weights, weights_vocab
from trainer.quantize.embedding import apply_embedding_int8, quantize_embeddings
from trainer.quantize.int4_linear import INT4_FUSED_GROUPS, Int4WeightLinear
from trainer.quantize.report import (compare_variants, cpu_features, cpu_flags, format_table,  # noqa: F401
                                     prepare_batches, state_dict_bytes, tensor_bytes)
from trainer.runs.checkpoints import safe_load
from trainer.objectives.contrastive import apply_learned_temperature

PTQ_METHODS = ("dynamic_int8", "weight_int8", "weight_int4")
METHODS = (*PTQ_METHODS, "qat_int8")
QUANTIZE = ("none", *METHODS)  # quantize=<method>
FULL_PRECISION = "token embedding and LM head (tied by default), norms, position parameters"
FULL_PRECISION_INT8_EMBEDDING = "norms, position parameters, biases, an untied LM head (token embedding: int8)"
TESTED = "torch 2.13.0 + torchao 0.18.0"
FALLBACK = "trainer.quantize.int4_linear.Int4WeightLinear"

def _ao():
    """torchao.quantization, imported quietly (its CUDA-only extensions warn on a CPU build), or a
    ConfigError saying which versions to install."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
        import torchao.quantization.qat  # noqa: F401
    except Exception as e:  # missing, or built for another torch
        raise ConfigError(f"quantization needs torchao, which failed to import with torch {torch.__version__} "
                          f"({type(e).__name__}: {str(e)[:120]}); install the torchao built for your torch "
                          f"(tested: {TESTED}; e.g. pip install 'torchao==0.18.0' for torch 2.12-2.13).") from e
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return tq

# ---------------------------------------------------------------- layer selection

def _block_children(model: nn.Module, types: tuple) -> list[tuple[str, nn.Module, str, nn.Module]]:
    found = []
    for block_name, block in model.named_modules():
        if isinstance(block, Block):
            for parent_name, parent in block.named_modules():
                for attr, child in parent.named_children():
                    if isinstance(child, types):
                        found.append((".".join(p for p in (block_name, parent_name, attr) if p), parent, attr, child))
    return found

def block_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, attribute, layer) of every block linear, quantized by the int4 fallback or not."""
    return _block_children(model, (nn.Linear, Int4WeightLinear))

def full_precision(embeddings: bool) -> str:
    """What a quantized model keeps in full precision (the report's wording)."""
    return FULL_PRECISION_INT8_EMBEDDING if embeddings else FULL_PRECISION

def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent module, attribute, layer) of every nn.Linear inside a Block."""
    return _block_children(model, (nn.Linear,))

def linear_state(model: nn.Module) -> dict:
    """The state_dict entries of the block linears (quantized or not) only."""
    prefixes = tuple(name + "." for name, *_ in _block_children(model, (nn.Linear, Int4WeightLinear)))
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}

def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ConfigError unless `group_size` (even, > 0) divides every block layer's input size."""
    sizes = sorted({lin.in_features for *_, lin in block_linears(model)})
    if group_size <= 0 or group_size % 2 or any(k % group_size for k in sizes):
        fits = [str(g) for g in (16, *INT4_FUSED_GROUPS) if all(k % g == 0 for k in sizes)]
        raise ConfigError(f"quantize.group_size={group_size} must be even and divide every quantized "
                          f"layer's input size ({', '.join(map(str, sizes))})"
                          + (f"; e.g. {' or '.join(fits)}." if fits else "."))

# ---------------------------------------------------------------- methods

def _int4_on_torchao(device: torch.device) -> bool:
    """torchao's Int4WeightOnlyConfig (plain format) runs on CUDA with the mslk kernels only."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("mslk") is not None

def plan(method: str, device: torch.device, group_size: int = 32, precision: str = "fp32") -> dict:
    """What `method` runs on `device`: {library, config, kernel, compiled_kernel, fallback}."""
    if method not in METHODS:
        raise ConfigError(f"quantize={method!r} is not a quantization method; choose one of: {', '.join(METHODS)}.")
    f, cpu = cpu_features(), device.type == "cpu"
    # torchao's CPU int8 GEMM: u8s8 (activations shifted by 128) where VNNI is the best there is.
    mm = ("torch._int_mm " + ("u8s8 (AVX512-VNNI)" if f["AVX512-VNNI"] and not f["AMX"] else "s8s8"
                              + (" (AMX)" if f["AMX"] else "")) if cpu else "torch._int_mm (cuBLAS)")
    row = {"dynamic_int8": ("torchao", "Int8DynamicActivationInt8WeightConfig", f"per-token int8 quantize + {mm}"),
           "weight_int8": ("torchao", "Int8WeightOnlyConfig", "int8 weight cast to float + torch.mm"),
           "qat_int8": ("torchao", "QATConfig(step=convert) -> Int8DynamicActivationInt8WeightConfig"
                        "(act_mapping_type=ASYMMETRIC)", f"per-token int8 quantize + {mm}")}.get(method)
    if method == "weight_int4" and _int4_on_torchao(device):
        row = ("torchao", f"Int4WeightOnlyConfig(group_size={group_size})", "mslk int4 GEMM")
    elif method == "weight_int4":
        fused = cpu and precision in ("bf16", "fp16") and group_size in INT4_FUSED_GROUPS
        row = ("trainer (fallback)", f"{FALLBACK}(group_size={group_size})",
               "torch._weight_int4pack_mm_for_cpu" if fused else "int4 unpack + dequantize + F.linear")
    reason = "" if row[0] == "torchao" else "torchao 0.18's Int4WeightOnlyConfig has no kernel here (needs CUDA + mslk)"
    return {"library": row[0], "config": row[1], "kernel": row[2],
            "compiled_kernel": "torch.compile (inductor) of: " + row[2], "fallback": reason}

def _ptq_config(method: str, group_size: int):
    tq = _ao()
    if method == "weight_int8":
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    if method == "weight_int4":
        return tq.Int4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    # qat_int8's activations were fake-quantized asymmetrically (torchao has no symmetric per-token QAT).
    mapping = tq.MappingType.ASYMMETRIC if method == "qat_int8" else tq.MappingType.SYMMETRIC
    return tq.Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping, set_inductor_config=False)

def _only_block_linears(model: nn.Module):
    ids = {id(lin) for *_, lin in block_linears(model)}
    return lambda module, fqn: id(module) in ids

def apply_ptq(model: nn.Module, method: str, group_size: int = 32, embeddings: bool | None = None) -> nn.Module:
    """Quantize the block linears of `model` in place with torchao (int4 on a device without a
    torchao kernel: the trainer.qlinear fallback), and its token embedding to int8 weight-only
    when `embeddings` says so; returns it.

    Args:
        model: a float model, or one prepared by apply_qat (then it is converted).
        method: dynamic_int8 | weight_int8 | weight_int4 | qat_int8.
        group_size: weight_int4 only: inputs per scale/zero pair.
        embeddings: quantize.embeddings; None: True for an encoder, False otherwise
            (`embedding.quantize_embeddings`).
    """
    plan(method, torch.device("cpu"))  # a ConfigError for an unknown method
    tq = _ao()
    if any(isinstance(m, tq.qat.FakeQuantizedLinear) for m in model.modules()):
        tq.quantize_(model, tq.qat.QATConfig(step="convert"))  # back to nn.Linear, trained weights kept
    with_table = quantize_embeddings(embeddings, model)
    if method == "weight_int4":
        check_group_size(model, group_size)
        if not _int4_on_torchao(next(model.parameters()).device):
            for _, parent, attr, lin in block_linears(model):
                setattr(parent, attr, Int4WeightLinear.from_float(lin, group_size))
            return apply_embedding_int8(model, tq) if with_table else model
    tq.quantize_(model, _ptq_config(method, group_size), filter_fn=_only_block_linears(model))
    return apply_embedding_int8(model, tq) if with_table else model

def apply_qat(model: nn.Module, cfg) -> nn.Module:
    """Prepare `model` for training under `cfg` (= cfg.quantize).

    qat_int8: torchao's QATConfig(step="prepare") turns the block linears into FakeQuantizedLinear
    (same parameters and names). Other methods: the model is returned unchanged, after the report's
    settings are checked, so a bad one fails before training rather than after.
    """
    if cfg.method != "none" and ((cfg.eval_batches is not None and cfg.eval_batches < 1)
                                 or cfg.latency_batches < 1):
        raise ConfigError(f"quantize.eval_batches={cfg.eval_batches} and quantize.latency_batches="
                          f"{cfg.latency_batches} must both be >= 1.")
    if cfg.method != "none" and str(cfg.get("compile", "both")).lower() not in ("true", "false", "both"):
        raise ConfigError(f"quantize.compile={cfg.compile!r} is not valid; choose one of: true, false, both.")
    if cfg.method == "weight_int4":
        check_group_size(model, cfg.group_size)
    if cfg.method == "none":
        return model
    tq = _ao()
    if cfg.method != "qat_int8" or any(isinstance(m, tq.qat.FakeQuantizedLinear) for m in model.modules()):
        return model
    fq = tq.qat.IntxFakeQuantizeConfig
    qat = tq.qat.QATConfig(activation_config=fq(torch.int8, "per_token", is_symmetric=False),
                           weight_config=fq(torch.int8, "per_channel"), step="prepare")
    tq.quantize_(model, qat, filter_fn=_only_block_linears(model))
    return model

def finalize_qat(model: nn.Module, weights: dict) -> dict:
    """The trained QAT weights as a plain state_dict for an unquantized build_model(...) model.

    torchao's FakeQuantizedLinear keeps nn.Linear's parameter names and adds no state, so this
    is a check plus a shallow copy; the conversion happens in apply_ptq (QATConfig step="convert").
    """
    expected = set(model.state_dict())
    if set(weights) != expected:
        raise RuntimeError(f"QAT weights do not match the model's keys: {sorted(set(weights) ^ expected)[:5]}")
    return dict(weights)

# ---------------------------------------------------------------- build, save, load

def build_init_model(cfg, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """A freshly initialized unquantized model for root config `cfg` with `vocab_size` embedding
    rows (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        return build_run_model(cfg, vocab_size)

def build_float_model(cfg, weights: dict) -> nn.Module:
    """An unquantized model for root config `cfg`, loaded with the plain state_dict `weights`."""
    return model_with_weights(cfg, weights)

def load_quantized(path: str, cfg, method: str | None = None) -> nn.Module:
    """Load a `model_<method>.pt` written by post_training_report (weights_only=True: torchao
    registers its tensor subclasses as safe globals on import).

    Args:
        path: the file. cfg: the run's root config (model sizes, quantize.group_size).
        method: the quantization in the file; default cfg.quantize.method.
    """

    _ao()
    state = safe_load(path, what="quantized weights")
    model = build_init_model(cfg, weights_vocab(state))
    if "logit_scale" in state:  # a contrastive run's learned temperature

        apply_learned_temperature(model, cfg.objective.temperature)
    zeros = [k for k in state if k.endswith(".zero")]
    if zeros and (method or cfg.quantize.method) in ("weight_int4", "none"):  # the int4 fallback's layout
        packed, scale = state[zeros[0].removesuffix("zero") + "weight"], state[zeros[0]]
        for _, parent, attr, lin in block_linears(model):  # group size read off the shapes
            setattr(parent, attr, Int4WeightLinear.from_float(lin, 2 * packed.shape[1] // scale.shape[1]))
    model.load_state_dict(state, assign=True)  # torchao tensors replace the float weights as they are
    return model.eval()

def quantized_layers(model: nn.Module) -> int:
    """Block linears whose weight is quantized (a torchao tensor subclass or the int4 fallback)."""
    return sum(isinstance(m, Int4WeightLinear) or type(m.weight) not in (torch.Tensor, nn.Parameter)
               for *_, m in _block_children(model, (nn.Linear, Int4WeightLinear)))
