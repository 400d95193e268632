"""The architecture choices pretrained families brought in, used from scratch: q/k norm under every
attention kernel and the KV cache, biases, tanh GELU, an embedding norm, token types, head_dim,
and learned positions with an offset; and the padded vocabulary: rows beyond the real tokens get
zero probability in sampling, greedy decoding and the loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.build import build_model
from trainer.config.validate import validate
from trainer.errors import ConfigError
from trainer.generate import generate
from trainer.objectives.base import cross_entropy_sum

OPTIONS = ["model.qk_norm=true", "model.bias=true", "model.activation=gelu_tanh", "model.embed_norm=true",
           "model.token_types=2", "model.head_dim=12", "norm=rmsnorm"]


def _model(make_cfg, *overrides: str, vocab: int = 384, num_tokens: int | None = None):
    cfg = make_cfg(*overrides)
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=vocab,
                        max_len=cfg.data.seq_len, num_tokens=num_tokens)
    return model.eval(), cfg


@pytest.mark.parametrize("kernel", ["standard", "flash", "tiled"])
def test_qk_norm_and_friends_decode_the_same_with_and_without_the_cache(make_cfg, kernel):
    """Every new choice at once, on a decoder with rope: the KV cache (which must hold normalized
    keys) gives the full recomputation's tokens, and the kernels agree with the standard one."""
    model, _ = _model(make_cfg, "model=decoder", "position=rope", f"attention={kernel}", "attention.block_size=4",
                      *OPTIONS)
    assert model.decoder.blocks[0].self_attn.q_norm is not None and model.decoder.blocks[0].self_attn.dh == 12
    assert model.decoder.blocks[0].ffn.up.bias is not None and model.decoder.embed_norm is not None
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    cached = generate(model, prompt, 12, temperature=0.0, kv_cache=True, eos_id=None)
    full = generate(model, prompt, 12, temperature=0.0, kv_cache=False, eos_id=None)
    assert cached.tolist() == full.tolist()
    ref, _ = _model(make_cfg, "model=decoder", "position=rope", "attention=standard", *OPTIONS)
    with torch.no_grad():
        assert (model(prompt) - ref(prompt)).abs().max() < 1e-4


def test_qk_norm_normalizes_each_head_of_queries_and_keys(make_cfg):
    """With unit norm weights, every head's query and key entering attention has RMS 1 (checked on
    the tensors the kernel receives), whatever the projection's scale (eps 1e-10: negligible)."""
    model, _ = _model(make_cfg, "model=decoder", "position=none", "attention=standard", "model.qk_norm=true",
                      "norm.eps=1e-10")
    attn = model.decoder.blocks[0].self_attn
    seen = {}
    import models.blocks as blocks

    real = blocks.attention

    def spy(q, k, v, **kw):
        seen["q"], seen["k"] = q, k
        return real(q, k, v, **kw)

    blocks.attention = spy
    try:
        with torch.no_grad():
            attn.qkv.weight.mul_(7.0)
            model(torch.randint(0, 256, (2, 5)))
    finally:
        blocks.attention = real
    for t in (seen["q"], seen["k"]):
        rms = t.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_learned_positions_with_an_offset_skip_the_leading_rows(make_cfg):
    """position_offset=2: position p reads table row p + 2 (RoBERTa), checked against the rows."""
    model, _ = _model(make_cfg, "model=encoder", "position=learned", "model.max_positions=40",
                      "model.position_offset=2")
    pos = model.encoder.position
    assert pos.emb.weight.shape[0] == 40 and pos.max_len == 38
    x = torch.zeros(1, 5, pos.emb.weight.shape[1])
    assert torch.equal(pos.embed(x)[0], pos.emb.weight[2:7])
    with pytest.raises(ValueError, match="at most 38 tokens"):
        pos.embed(torch.zeros(1, 39, x.shape[-1]))


@pytest.mark.parametrize("bad, match", [
    (["model.position_offset=2"], "position=learned"),
    (["position=learned", "model.max_positions=20"], "data.seq_len=32 needs more positions"),
    (["model.head_dim=7", "position=rope"], "even head size"),
    (["model.activation=gelu_fast"], "model.activation"),
])
def test_bad_architecture_choices_are_refused_in_one_sentence(make_cfg, bad, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*bad))


@pytest.mark.parametrize("num_tokens", [70, 321])  # neither is a multiple of 64
def test_padding_rows_get_zero_probability(make_cfg, num_tokens):
    """The head's rows from num_tokens up to the padded vocabulary: -inf logits, so sampling (at a
    high temperature, even with those rows made the most likely), greedy decoding and the loss
    never touch them; the loss equals the loss over the real rows alone."""
    vocab = -(-num_tokens // 64) * 64
    model, _ = _model(make_cfg, "model=decoder", vocab=vocab, num_tokens=num_tokens)
    with torch.no_grad():  # make the padding rows the best continuation of anything
        model.embed.weight[num_tokens:] = 5.0 * model.decoder.final_norm.weight.sign()
    prompt = torch.randint(0, min(num_tokens, 256), (8, 4), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt, 20, temperature=2.0, generator=gen, eos_id=None)
    greedy = generate(model, prompt, 5, temperature=0.0, eos_id=None)
    assert int(sampled.max()) < num_tokens and int(greedy.max()) < num_tokens
    with torch.no_grad():
        logits = model(prompt)
        target = torch.randint(0, num_tokens, prompt.shape, generator=torch.Generator().manual_seed(2))
        loss, _ = cross_entropy_sum(logits, target)
        real = F.cross_entropy(logits[..., :num_tokens].reshape(-1, num_tokens), target.reshape(-1), reduction="sum")
    assert torch.isneginf(logits[..., num_tokens:]).all()
    assert math.isclose(float(loss), float(real), rel_tol=1e-6)
