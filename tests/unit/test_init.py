"""An untrained model is not confidently wrong: its first loss is near ln(vocab) for every
architecture x position x norm x placement, at the suite's tiny size and the default size."""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from conftest import compose_cfg
from models.build import build_model
from trainer.objectives import resolve_objective
from trainer.data import BOS, EOS, VOCAB_SIZE
from trainer.objectives import build_objective

SIZES = {"tiny": ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.d_ff=128"],
         "default": ["model.d_model=192", "model.num_layers=4", "model.num_heads=6", "model.d_ff=768"],
         # experiment=bench_ref's width, where an unscaled tied head under post-norm started at
         # ln V + 1.7 (fewer layers than bench_ref: depth does not change the first loss).
         "d384": ["model.d_model=384", "model.num_layers=1", "model.num_heads=6", "model.d_ff=1536"]}


def _blocks(rows: int, length: int) -> torch.Tensor:
    """Real text as the trainer packs it (BOS + utf-8 bytes + EOS), cut into blocks."""
    text = open(__file__, "rb").read()
    ids = torch.tensor([BOS, *text[: rows * length - 2], EOS], dtype=torch.long)
    return ids.view(rows, length)


@functools.lru_cache(maxsize=None)
def _base_cfg(size: str):
    return compose_cfg(*SIZES[size], "data.seq_len=64")


def _first_loss(size: str, arch: str, pos: str, norm: str, place: str, head_scale: float | None = None) -> float:
    """Mean loss of the untrained model (seed 0) on real text, by the objective `model=arch` trains."""
    cfg = _base_cfg(size).copy()  # the groups' options only set these kinds: one compose per size
    cfg.model.arch, cfg.position.kind, cfg.norm.kind, cfg.norm.placement = arch, pos, norm, place
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=64)
    if head_scale is not None:
        model.head_scale = head_scale
    objective = build_objective(resolve_objective(arch, "auto"), cfg.objective)
    batch = objective.prepare(_blocks(4, 65), torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_sum, _ = objective.loss(model, batch)
    return loss_sum.item() / objective.num_targets(batch)


@pytest.mark.parametrize("size", list(SIZES))
def test_first_loss_is_near_uniform_for_every_component_choice(size):
    worst = []
    for arch, pos, norm, place in itertools.product(
            ["decoder", "encoder", "encoder_decoder"], ["sinusoidal", "learned", "relative", "rope", "alibi", "none"],
            ["layernorm", "rmsnorm", "batchnorm"], ["pre", "post"]):
        worst.append((abs(_first_loss(size, arch, pos, norm, place) - math.log(VOCAB_SIZE)), arch, pos, norm, place))
    worst.sort()
    assert worst[-1][0] < 0.5, worst[-5:]


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_post_norm_tied_head_is_scaled_by_one_over_width(arch):
    """Post-norm with a tied head scales the head's input by 1 / (0.02 d) (muP-style 1/width
    readout, capped at 1); without it the untrained d-384 model predicts its input token and
    starts > 0.5 nats above ln V."""
    cfg = compose_cfg(*SIZES["d384"], f"model={arch}", "norm.placement=post")
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=64)
    assert model.head_scale == pytest.approx(1 / (0.02 * 384))
    narrow = compose_cfg("model.d_model=32", f"model={arch}", "norm.placement=post")
    assert build_model(narrow.model, narrow.attention, narrow.position, narrow.norm, vocab_size=VOCAB_SIZE,
                       max_len=64).head_scale == 1.0  # 0.02 * 32 < 1: the input token's logit is < 1
    pre = compose_cfg(*SIZES["d384"], f"model={arch}", "norm.placement=pre")
    assert build_model(pre.model, pre.attention, pre.position, pre.norm, vocab_size=VOCAB_SIZE,
                       max_len=64).head_scale == 1.0
    untied = compose_cfg(*SIZES["d384"], f"model={arch}", "norm.placement=post", "model.tie_embeddings=false")
    assert build_model(untied.model, untied.attention, untied.position, untied.norm, vocab_size=VOCAB_SIZE,
                       max_len=64).head_scale == 1.0
    ln_v = math.log(VOCAB_SIZE)
    assert abs(_first_loss("d384", arch, "rope", "layernorm", "post") - ln_v) < 0.5
    assert _first_loss("d384", arch, "rope", "layernorm", "post", head_scale=1.0) > ln_v + 0.5


def test_embedding_is_gpt2_initialised_and_unscaled():
    """N(0, 0.02) token embedding entering the stack as is (GPT-2), sinusoids on the same scale."""
    cfg = compose_cfg("model.d_model=256", "model.num_layers=3", "model.num_heads=4", "model.d_ff=512")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=32)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.03)
    tokens = torch.randint(0, 256, (2, 8))
    assert torch.equal(model._embed(tokens), model.embed(tokens))
    x = torch.zeros(1, 8, 256)
    pos = model.decoder.position.embed(x)[0]
    assert pos.pow(2).mean().sqrt().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.02)
    # residual projections: 0.02 / sqrt(2 * 3)
    assert model.decoder.blocks[0].ffn.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert model.decoder.blocks[0].ffn.up.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_encoder_decoder_scales_each_stack_by_its_own_depth():
    """The same architecture whether num_decoder_layers is left to default or written out, and
    each stack's residual projections scaled by its own depth."""
    a = compose_cfg("model=encoder_decoder", "model.num_layers=2")
    b = compose_cfg("model=encoder_decoder", "model.num_layers=2", "model.num_decoder_layers=2")
    c = compose_cfg("model=encoder_decoder", "model.num_layers=2", "model.num_decoder_layers=8",
                    "model.d_model=256", "model.d_ff=1024")
    models = []
    for cfg in (a, b):
        torch.manual_seed(0)
        models.append(build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=32))
    for (k, v), (_, w) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(v, w), k
    torch.manual_seed(0)
    m = build_model(c.model, c.attention, c.position, c.norm, vocab_size=VOCAB_SIZE, max_len=32)
    enc = torch.cat([b.ffn.down.weight.flatten() for b in m.encoder.blocks]).std().item()
    dec = torch.cat([b.ffn.down.weight.flatten() for b in m.decoder.blocks]).std().item()
    assert enc == pytest.approx(0.02 / 2, rel=0.03) and dec == pytest.approx(0.02 / 4, rel=0.03)


@pytest.mark.parametrize("extra", [["model.qk_norm=true"], ["model.qk_norm=true", "norm=rmsnorm", "position=rope"],
                                   ["objective.z_loss=1e-4"]])
def test_first_loss_is_near_uniform_with_recipe_choices(extra):
    """The recipe's model and loss choices start near ln(vocab) too (decoder, default size)."""
    cfg = compose_cfg(*SIZES["default"], "data.seq_len=64", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=64)
    objective = build_objective("clm", cfg.objective)
    batch = objective.prepare(_blocks(4, 65), torch.Generator().manual_seed(0))
    with torch.no_grad():  # the plain cross-entropy (z-loss only joins the loss under autograd)
        loss = objective.loss(model, batch)[0].item() / objective.num_targets(batch)
    assert abs(loss - math.log(VOCAB_SIZE)) < 0.5, loss


@pytest.mark.parametrize("extra", [["model.activation=relu2"], ["model.logit_softcap=15"],
                                   ["model.activation=relu2", "model.logit_softcap=15", "model.qk_norm=true"]])
def test_first_loss_is_near_uniform_with_recipe_model_choices(extra):
    test_first_loss_is_near_uniform_with_recipe_choices(extra)
