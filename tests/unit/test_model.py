"""Model-level behaviour: causality for every attention x position pair, both sides for the
encoder, padding invariance with batchnorm, length generalization, build checks."""
from __future__ import annotations

import itertools

import pytest
import torch

from models.build import build_model, num_params
from models.ops.attention import KERNELS as ATTENTIONS
from models.norm import NORMS
from models.position import POSITIONS
from trainer.data import VOCAB_SIZE


def _model(make_cfg, *overrides: str, max_len: int = 32):
    cfg = make_cfg("model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "attention.block_size=8",
                   *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=max_len)
    return model.eval()


@pytest.mark.parametrize("attention,position", list(itertools.product(ATTENTIONS, POSITIONS)))
def test_decoder_cannot_see_the_future(make_cfg, attention, position):
    model = _model(make_cfg, "model=decoder", f"attention={attention}", f"position={position}")
    x = torch.randint(0, 256, (2, 29))
    t = 13
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 256, (2, 29 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6  # the future does reach later positions


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_encoder_sees_both_sides(make_cfg, attention):
    model = _model(make_cfg, "model=encoder", f"attention={attention}")
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-6  # the first token sees the last one


def test_encoder_decoder_decoder_is_causal_and_reads_the_source(make_cfg):
    model = _model(make_cfg, "model=encoder_decoder")
    src, tgt = torch.randint(0, 256, (2, 17)), torch.randint(0, 256, (2, 11))
    tgt2 = tgt.clone()
    tgt2[:, 6:] = (tgt2[:, 6:] + 7) % 256
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 256
    with torch.no_grad():
        base = model(src, target=tgt)
        torch.testing.assert_close(base[:, :6], model(src, target=tgt2)[:, :6])
        assert (base[:, 0] - model(src2, target=tgt)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_batchnorm_padding_does_not_change_real_positions(make_cfg, attention):
    """Padded positions (mask False) are ignored by attention and by batchnorm statistics."""
    model = _model(make_cfg, "model=encoder", "norm=batchnorm", f"attention={attention}").train()
    x = torch.randint(0, 256, (3, 12))
    padded = torch.cat([x, torch.randint(0, 256, (3, 5))], dim=1)
    mask = torch.cat([torch.ones(3, 12, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(padded, mask=mask)
    torch.testing.assert_close(a, b[:, :12], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["alibi", "relative", "rope", "sinusoidal"])
def test_runs_longer_than_trained(make_cfg, position):
    model = _model(make_cfg, "model=decoder", f"position={position}", max_len=16)
    out = model(torch.randint(0, 256, (1, 64)))
    assert out.shape == (1, 64, VOCAB_SIZE) and torch.isfinite(out).all()


def test_learned_position_refuses_longer_sequences(make_cfg):
    model = _model(make_cfg, "model=decoder", "position=learned", max_len=16)
    with pytest.raises(ValueError, match="at most 16"):
        model(torch.randint(0, 256, (1, 17)))


@pytest.mark.parametrize("norm,placement", list(itertools.product(NORMS, ["pre", "post"])))
def test_final_norm_only_with_pre_norm(make_cfg, norm, placement):
    model = _model(make_cfg, f"norm={norm}", f"norm.placement={placement}")
    assert (model.decoder.final_norm is not None) == (placement == "pre")


def test_gqa_shrinks_kv_projection(make_cfg):
    full = _model(make_cfg, "model.num_kv_heads=4")
    mqa = _model(make_cfg, "model.num_kv_heads=1")
    assert num_params(mqa) < num_params(full)
    assert mqa.decoder.blocks[0].self_attn.qkv.out_features == 32 + 2 * 8
