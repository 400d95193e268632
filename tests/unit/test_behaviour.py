"""Behaviours the README names, checked against reference values at unit level: the SDPA path
attention=flash takes, positions beyond the trained length, FFN activations, untied heads,
decoder depth, and the checkpoint's temporary-name write."""
from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from models.build import build_model, num_params
from trainer.runs import checkpoints as ckpt
from trainer.errors import ConfigError
from trainer.data import VOCAB_SIZE
from trainer.distributed import Dist
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import build_scaler


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors run faster on one thread than with intra-op fan-out."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(make_cfg, *overrides: str, max_len: int = 32, seed: int = 0):
    cfg = make_cfg(*overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE, max_len=max_len)
    return model.eval(), cfg


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- attention=flash: the SDPA call


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict[str, Any]]:
    """Every call to F.scaled_dot_product_attention (its kwargs), still calling through; the CPU
    matmul-softmax path for short mask-free sequences is off, so every such call reaches SDPA."""
    import models.ops.attention as attn_mod

    monkeypatch.setattr(attn_mod, "MATMUL_SOFTMAX_MAX_SCORES", {})
    calls: list[dict[str, Any]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append({"shape": tuple(q.shape), "args": args, **kwargs})
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("position,kv_heads", [("sinusoidal", 4), ("rope", 2), ("none", 1)])
def test_flash_decoder_takes_mask_free_is_causal_path(make_cfg, sdpa_calls, position, kv_heads):
    """A purely causal decoder calls SDPA with is_causal=True and no attn_mask (so CUDA may pick
    FlashAttention), once per layer, and computes what the explicit standard kernel computes."""
    over = ("model=decoder", f"position={position}", f"model.num_kv_heads={kv_heads}")
    model, cfg = _build(make_cfg, *over, "attention=flash")
    reference, _ = _build(make_cfg, *over, "attention=standard")
    x = _tokens(2, 24)
    with torch.no_grad():
        out = model(x)
    calls = [c for c in sdpa_calls if c["shape"][2] == 24]
    assert len(calls) == cfg.model.num_layers, sdpa_calls
    for call in calls:
        assert call.get("is_causal") is True, call
        assert call.get("attn_mask") is None and not call["args"], call
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position,padded", [("alibi", False), ("relative", False), ("sinusoidal", True)])
def test_flash_with_bias_or_padding_passes_one_mask(make_cfg, sdpa_calls, position, padded):
    """A relative/ALiBi bias or a padding mask goes in as attn_mask (is_causal left off, since SDPA
    refuses both at once), and the result still matches the standard kernel."""
    over = ("model=decoder", f"position={position}")
    model, cfg = _build(make_cfg, *over, "attention=flash")
    reference, _ = _build(make_cfg, *over, "attention=standard")
    x = _tokens(2, 24)
    mask = None
    if padded:
        mask = torch.ones(2, 24, dtype=torch.bool)
        mask[0, -5:] = False
    with torch.no_grad():
        out = model(x, mask=mask)
        ref = reference(x, mask=mask)
    calls = [c for c in sdpa_calls if c["shape"][2] == 24]
    assert len(calls) == cfg.model.num_layers
    for call in calls:
        assert not call.get("is_causal", False), call
        m = call.get("attn_mask")
        assert isinstance(m, torch.Tensor) and m.shape[-2:] == (24, 24), call
        if not padded:  # the bias itself: finite on and below the diagonal, -inf above it
            upper = torch.ones(24, 24, dtype=torch.bool).triu(1)
            assert (m[0, 0][upper] == float("-inf")).all() and torch.isfinite(m[0, 0][~upper]).all()
    keep = mask[..., None] if mask is not None else torch.ones(2, 24, 1, dtype=torch.bool)
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- positions beyond the trained length


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "alibi", "relative", "none"])
def test_positions_extend_beyond_trained_length(make_cfg, position):
    """Built for T=16, a causal decoder run on 2T tokens gives, for the first T, exactly the logits
    of the T-token input (extending positions must not move the ones it was trained on), and for
    all 2T the logits of the same weights built for 2T (the extension is the scheme's own formula)."""
    t = 16
    # relative: few buckets and a max_distance between T and 2T, so log-spaced buckets and the
    # clamp beyond max_distance both fall inside the 2T window.
    extra = ("position.num_buckets=8", "position.max_distance=24") if position == "relative" else ()
    model, _ = _build(make_cfg, "model=decoder", f"position={position}", *extra, max_len=t)
    with torch.no_grad():
        # Trained-looking scale: at init (std 0.02) attention is nearly uniform whatever the
        # positions say, so a wrong rotation or bucket would hide below the tolerance.
        for block in model.decoder.blocks:
            block.self_attn.qkv.weight.mul_(10)
        if position == "relative":
            model.decoder.position.emb.weight.copy_(torch.randn(model.decoder.position.emb.weight.shape))
    built_long, _ = _build(make_cfg, "model=decoder", f"position={position}", *extra, max_len=2 * t)
    built_long.load_state_dict(model.state_dict())
    long = _tokens(2, 2 * t)
    with torch.no_grad():
        short = model(long[:, :t])
        full = model(long)
        again = model(long[:, :t])  # after any cache grew for 2T
        reference = built_long(long)
    assert full.shape == (2, 2 * t, VOCAB_SIZE)
    torch.testing.assert_close(full[:, :t], short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    assert (full[:, t:] - full[:, t - 1:t]).abs().max() > 1e-4  # later positions are not a copy


def test_learned_positions_refuse_longer_input_in_one_sentence(make_cfg):
    model, _ = _build(make_cfg, "model=decoder", "position=learned", max_len=16)
    with torch.no_grad():
        assert model(_tokens(1, 16)).shape == (1, 16, VOCAB_SIZE)
        with pytest.raises(ValueError) as err:
            model(_tokens(1, 32))
    text = str(err.value)
    assert "\n" not in text and "at most 16" in text and "32" in text and "position=rope" in text, text


# ---------------------------------------------------------------- model.activation, tie_embeddings, depth


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
def test_ffn_activation_matches_hand_computation(make_cfg, activation):
    model, cfg = _build(make_cfg, f"model.activation={activation}")
    ffn = model.decoder.blocks[0].ffn
    d, d_ff = cfg.model.d_model, cfg.model.d_ff
    w_up, w_down = ffn.up.weight.detach(), ffn.down.weight.detach()
    assert w_up.shape == ((2 if activation == "swiglu" else 1) * d_ff, d) and w_down.shape == (d, d_ff)
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(2))
    h = x @ w_up.t()
    if activation == "swiglu":  # SwiGLU (Shazeer 2020): silu(x W_gate) * (x W_value), gate first
        h = F.silu(h[..., :d_ff]) * h[..., d_ff:]
    elif activation == "relu":
        h = h.clamp(min=0)
    else:
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), h @ w_down.t(), atol=1e-6, rtol=1e-5)


def test_untied_embeddings_have_their_own_head(make_cfg):
    tied, cfg = _build(make_cfg, "model.tie_embeddings=true")
    untied, _ = _build(make_cfg, "model.tie_embeddings=false")
    assert tied.head is None
    assert isinstance(untied.head, torch.nn.Linear) and untied.head.weight is not untied.embed.weight
    assert untied.head.weight.shape == (VOCAB_SIZE, cfg.model.d_model)
    assert num_params(untied) == num_params(tied) + VOCAB_SIZE * cfg.model.d_model
    x = _tokens(2, 12)
    with torch.no_grad():
        hidden = untied(x, head=False)
        torch.testing.assert_close(untied(x), hidden @ untied.head.weight.t())
        assert (untied(x) - hidden @ untied.embed.weight.t()).abs().max() > 1e-3


def test_num_decoder_layers_sets_decoder_depth(make_cfg):
    model, _ = _build(make_cfg, "model=encoder_decoder", "model.num_layers=2", "model.num_decoder_layers=3")
    assert len(model.encoder.blocks) == 2 and len(model.decoder.blocks) == 3
    assert all(b.cross_attn is not None for b in model.decoder.blocks)
    assert all(b.cross_attn is None for b in model.encoder.blocks)
    default, _ = _build(make_cfg, "model=encoder_decoder", "model.num_layers=2")
    assert len(default.encoder.blocks) == len(default.decoder.blocks) == 2
    per_block = num_params(model.decoder.blocks[0])
    assert num_params(model) == num_params(default) + per_block


def test_num_decoder_layers_default_is_the_same_model_as_stating_it(make_cfg):
    """num_decoder_layers=None means num_layers: the same seed gives the same weights either way
    (the GPT-2 residual scaling counts the decoder's blocks in both cases)."""
    implicit, _ = _build(make_cfg, "model=encoder_decoder", "model.num_layers=2")
    explicit, _ = _build(make_cfg, "model=encoder_decoder", "model.num_layers=2", "model.num_decoder_layers=2")
    a, b = implicit.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- checkpoint: temporary name, then rename


def _ckpt_objects(make_cfg):
    model, cfg = _build(make_cfg)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps)
    scaler = build_scaler("fp32", torch.device("cpu"), 1.0)
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                gen=torch.Generator().manual_seed(0), train_state={"step": 0}, meta={"structure": {}},
                keep=5, d=Dist(), sharded=False)


def test_checkpoint_is_written_to_a_temporary_name_then_renamed(make_cfg, tmp_path, monkeypatch):
    objects = _ckpt_objects(make_cfg)
    directory = str(tmp_path / "checkpoints")
    final = os.path.join(directory, "step_00000003.pt")
    written: list[tuple[str, bool]] = []
    real_save = torch.save

    def spy(obj, f, *args, **kwargs):
        written.append((str(f), os.path.exists(final)))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", spy)
    assert ckpt.save_checkpoint(directory, 3, **objects) == final
    assert len(written) == 1
    tmp, final_existed = written[0]
    assert os.path.dirname(tmp) == directory  # same filesystem: the rename is atomic
    assert os.path.basename(tmp) != "step_00000003.pt" and not final_existed
    assert not os.path.exists(tmp) and os.listdir(directory) == ["step_00000003.pt"]
    assert torch.load(final, weights_only=True)["step"] == 3


def test_interrupted_write_leaves_no_complete_looking_file(make_cfg, tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint as the newest one listed."""
    objects = _ckpt_objects(make_cfg)
    directory = str(tmp_path / "checkpoints")
    ckpt.save_checkpoint(directory, 3, **objects)
    before = (tmp_path / "checkpoints" / "step_00000003.pt").read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(directory, 6, **objects)
    assert ckpt.list_checkpoints(directory) == [os.path.join(directory, "step_00000003.pt")]
    assert ckpt.find_resume("auto", directory) == os.path.join(directory, "step_00000003.pt")
    assert (tmp_path / "checkpoints" / "step_00000003.pt").read_bytes() == before


def test_leftover_tmp_files_are_never_listed_or_loaded(make_cfg, tmp_path):
    objects = _ckpt_objects(make_cfg)
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(str(directory), 3, **objects)
    # A complete-looking leftover at a newer step, and a garbage one: neither is a checkpoint.
    (directory / "step_00000009.pt.tmp").write_bytes((directory / "step_00000003.pt").read_bytes())
    (directory / "step_00000012.pt.tmp").write_bytes(b"garbage")
    assert ckpt.list_checkpoints(str(directory)) == [str(directory / "step_00000003.pt")]
    assert ckpt.find_resume("auto", str(directory)) == str(directory / "step_00000003.pt")
    assert ckpt.find_resume(str(tmp_path), str(directory)) == str(directory / "step_00000003.pt")
    with pytest.raises(ConfigError, match="trainer.resume=never"):
        ckpt.find_resume("never", str(directory))
    # Pruning counts complete checkpoints only and leaves the leftovers' fate to the user.
    for step in (6, 9):
        ckpt.save_checkpoint(str(directory), step, **{**objects, "keep": 2})
    assert sorted(p.name for p in directory.glob("step_*.pt")) == ["step_00000006.pt", "step_00000009.pt"]
    assert (directory / "step_00000012.pt.tmp").read_bytes() == b"garbage"
    assert torch.load(directory / "step_00000009.pt", weights_only=True)["step"] == 9
