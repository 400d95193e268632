"""The token embedding in int8 (`quantize.embeddings`): on by default for encoders, off for decoders;
lookups within half a quantization step of the float table, one byte per value, saved and loaded
back; and the report's table of which tensor group is in which format."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import VOCAB_SIZE
from trainer.quantize import apply_ptq, load_quantized, tensor_bytes
from trainer.quantize.formats import format_formats_table, tensor_formats

from test_quantize import _model  # the same small model, seeded


def _is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter)


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_int8", "weight_int4"])
def test_encoder_embedding_is_int8_by_default(make_cfg, method):
    """Every row of the looked-up table is within half a step of the float row (symmetric int8 per
    row: step max|row| / 127), stored in one byte per value plus a per-row scale."""
    model, _ = _model(make_cfg, "model=encoder")
    table = model.embed.weight.detach().clone()
    quant = apply_ptq(copy.deepcopy(model), method, 32)
    assert _is_quantized(quant.embed.weight)
    ids = torch.arange(VOCAB_SIZE)
    with torch.no_grad():
        looked_up = quant.embed(ids)
    step = table.abs().amax(dim=1, keepdim=True) / 127
    assert ((looked_up - table).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    rows, dim = table.shape
    assert rows * dim <= tensor_bytes(quant.embed.weight) <= rows * dim + 8 * rows  # int8 + per-row scale/zero


def test_decoder_keeps_its_tied_table_in_fp32_unless_asked(make_cfg):
    model, _ = _model(make_cfg, "model=decoder")
    assert not _is_quantized(apply_ptq(copy.deepcopy(model), "weight_int8").embed.weight)
    encoder, _ = _model(make_cfg, "model=encoder")
    assert not _is_quantized(apply_ptq(copy.deepcopy(encoder), "weight_int8", embeddings=False).embed.weight)
    # Asked for: the tied head multiplies by the same int8 table the lookup dequantizes.
    quant = apply_ptq(copy.deepcopy(model), "weight_int8", embeddings=True)
    assert _is_quantized(quant.embed.weight)
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        table = quant.embed(torch.arange(VOCAB_SIZE))  # (V, D) dequantized rows
        torch.testing.assert_close(quant.logits(hidden), F.linear(hidden, table), rtol=1e-5, atol=1e-5)


def test_saved_and_loaded_encoder_gives_the_same_embeddings(make_cfg, tmp_path):
    model, cfg = _model(make_cfg, "model=encoder")
    quant = apply_ptq(copy.deepcopy(model), "dynamic_int8")
    torch.save(quant.state_dict(), tmp_path / "model_dynamic_int8.pt")
    loaded = load_quantized(str(tmp_path / "model_dynamic_int8.pt"), cfg, "dynamic_int8")
    assert _is_quantized(loaded.embed.weight)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, head=False), quant(tokens, head=False))


def test_format_table_accounts_for_every_tensor(make_cfg):
    """One row per tensor group; the rows' bytes add up to the state_dict's data bytes, and each
    group's format names what is stored (int8 weights and table, fp32 norms)."""
    model, _ = _model(make_cfg, "model=encoder", "position=learned")
    quant = apply_ptq(copy.deepcopy(model), "weight_int8")
    rows = {r["group"]: r for r in tensor_formats(quant)}
    state = quant.state_dict()
    assert sum(r["tensors"] for r in rows.values()) == len(state)
    assert sum(r["mb"] for r in rows.values()) * 1e6 == pytest.approx(sum(tensor_bytes(t) for t in state.values()))
    assert "int8" in rows["block linear weights"]["format"] and "int8" in rows["token embedding"]["format"]
    assert rows["norms"]["format"] == "fp32" and rows["positions"]["format"] == "fp32"
    assert "| token embedding |" in format_formats_table(list(rows.values()))
