"""The numbers a run reports, checked against computations made here, independently of trainer/:
FLOPs per token, parameter counts, MFU and tokens/s, the step-1 loss, the logged learning rate,
timings and peak memory, and a non-finite loss stopping the CLI before its optimizer step."""
from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, run_cli, tiny_cli_args
from tb import read_scalars
from trainer.run import run

VOCAB = 384  # 256 bytes + PAD, BOS, EOS, MASK + 124 span sentinels (README, "What gets trained on")


def _summary(run_dir) -> dict:
    with open(f"{run_dir}/summary.json") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# FLOPs per token, by hand


def _flops_by_hand(vocab: int) -> int:
    """experiment=bench_ref: decoder, 6 layers, d 384, 6 heads (Dh 64), d_ff 1536, T 256.
    2 FLOPs per multiply-add; attention scores and values counted over all T keys; training 3x."""
    L, d, h, dff, T = 6, 384, 6, 1536, 256
    dh = d // h
    qkv = 2 * d * (3 * h * dh)  # x @ W_qkv: d inputs -> 3 * 384 outputs
    out = 2 * (h * dh) * d  # attention output projection
    up = 2 * d * dff  # FFN up (GELU: one matrix)
    down = 2 * dff * d  # FFN down
    scores = 2 * h * T * dh  # each head: q . k against T keys
    values = 2 * h * T * dh  # each head: probs @ v over T keys
    head = 2 * d * vocab  # tied LM head
    forward = L * (qkv + out + up + down + scores + values) + head
    return 3 * forward


def test_flops_per_token_of_bench_ref_by_hand(tmp_path):
    from trainer.data import VOCAB_SIZE
    from trainer.flops import train_flops_per_token

    assert VOCAB_SIZE == VOCAB
    expected = _flops_by_hand(VOCAB)
    assert expected == 71_663_616
    # README's 71.4 MFLOP/token is the peer benchmark's vocabulary of 256 (scripts/bench_peers.py).
    assert round(_flops_by_hand(256) / 1e6, 1) == 71.4
    cfg = compose_cfg("experiment=bench_ref", tiny=False)
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads, cfg.model.d_ff, cfg.data.seq_len) == \
        (384, 6, 6, 1536, 256)
    assert train_flops_per_token(cfg.model, cfg.data.seq_len, VOCAB_SIZE) == expected

    # A real (one-step, batch-2) bench_ref run reports the same number, and the README's 10.8M parameters.
    small = ["data.max_files=30", "trainer.batch_size=2", "trainer.max_steps=1", "trainer.eval_every=1",
             "trainer.eval_batches=1", "trainer.log_every=1", "trainer.checkpoint_every=1000",
             "trainer.progress=false", "trainer.device=cpu"]
    run(compose_cfg("experiment=bench_ref", *small, tiny=False), run_dir=str(tmp_path))
    saved = _summary(tmp_path)
    assert saved["flops_per_token"] == expected
    assert saved["parameters"] == _params_by_hand("decoder", d=384, layers=6, heads=6, d_ff=1536) == 10_774_272


# ---------------------------------------------------------------------------------------------
# Parameter counts, by hand


def _params_by_hand(arch: str, *, d: int, layers: int, heads: int, d_ff: int, kv_heads: int | None = None,
                    dec_layers: int | None = None, tied: bool = True) -> int:
    """Pre-norm LayerNorm (weight + bias) blocks, bias-free linears, sinusoidal positions (no
    parameters), GELU FFN, a final norm per stack, embedding V x d, untied head V x d."""
    kv = kv_heads or heads
    dh = d // heads
    norm = 2 * d
    self_attn = d * (heads + 2 * kv) * dh + heads * dh * d  # fused qkv + out
    cross_attn = d * heads * dh + d * 2 * kv * dh + heads * dh * d  # q from x, fused kv from memory, out
    ffn = d * d_ff + d_ff * d
    block = self_attn + ffn + 2 * norm
    total = VOCAB * d + (0 if tied else VOCAB * d)
    if arch in ("encoder", "encoder_decoder"):
        total += layers * block + norm
    if arch == "decoder":
        total += layers * block + norm
    if arch == "encoder_decoder":
        total += (dec_layers or layers) * (block + cross_attn + norm) + norm
    return total


@pytest.mark.parametrize("overrides,arch,kw", [
    ([], "decoder", {}),
    (["model=encoder"], "encoder", {}),
    (["model=encoder_decoder", "model.num_decoder_layers=3", "model.num_kv_heads=2"], "encoder_decoder",
     {"dec_layers": 3, "kv_heads": 2}),
    (["model.tie_embeddings=false"], "decoder", {"tied": False}),
])
def test_parameter_count_matches_architecture(tmp_path, overrides, arch, kw):
    one_step = ["trainer.max_steps=1", "trainer.eval_every=1", "trainer.eval_batches=1", "trainer.log_every=1"]
    summary = run(compose_cfg(*overrides, *one_step), run_dir=str(tmp_path))
    expected = _params_by_hand(arch, d=32, layers=2, heads=4, d_ff=64, **kw)
    assert _summary(tmp_path)["parameters"] == expected == summary["parameters"]
    weights = torch.load(tmp_path / "model.pt")
    assert sum(v.numel() for v in weights.values() if v.is_floating_point()) == expected


# ---------------------------------------------------------------------------------------------
# One fp32 decoder run, logging every step, shared by the checks below


STEPS, BATCH, SEQ, LR, WARMUP, FLOOR = 6, 8, 32, 2e-3, 2, 0.1


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32_run")
    # fixed blocks: the test rebuilds batch 0 from the store's block order
    cfg = compose_cfg("trainer.log_every=1", "trainer.checkpoint_every=1000", "data.random_offsets=false")
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.data.seq_len, cfg.optim.lr,
            cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio) == (STEPS, BATCH, SEQ, LR, WARMUP, FLOOR)
    returned = run(cfg, run_dir=str(run_dir))
    return cfg, run_dir, returned, _summary(run_dir), read_scalars(str(run_dir))


def test_step1_loss_equals_independent_cross_entropy(fp32_run):
    """Rebuild the model and batch 0 as run() does and compute the cross-entropy here."""
    from models.build import build_model
    from trainer.data import VOCAB_SIZE, BatchStream, load_corpus

    cfg, _, _, _, scalars = fp32_run
    corpus = load_corpus(cfg.data, cfg.seed)  # (cached: reading it draws no random numbers)
    random.seed(cfg.seed)  # as run(): every generator seeded with cfg.seed, then the model built
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    blocks = BatchStream(corpus.train, cfg.trainer.batch_size, cfg.seed).batch(0)  # (B, T + 1)
    x, y = blocks[:, :-1], blocks[:, 1:]
    with torch.no_grad():
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert abs(loss - math.log(VOCAB)) < 0.5  # an untrained model starts near ln(vocab)
    assert scalars["train/loss"][1] == pytest.approx(loss, abs=1e-5)


def _lr_factor(k: int) -> float:
    """The schedule by hand: linear warmup over WARMUP steps, cosine to FLOOR over the rest."""
    if k < WARMUP:
        return (k + 1) / WARMUP
    progress = min(1.0, (k - WARMUP) / (STEPS - WARMUP))
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def test_train_lr_is_the_lr_the_step_used(fp32_run):
    """Step s (1-based) is optimizer step s-1 of the schedule: it uses lr * factor(s - 1)."""
    _, _, _, _, scalars = fp32_run
    logged = [scalars["train/lr"][s] for s in range(1, STEPS + 1)]
    expected = [LR * _lr_factor(s - 1) for s in range(1, STEPS + 1)]
    assert expected[0] == pytest.approx(1e-3) and expected[1] == pytest.approx(2e-3)
    assert logged == pytest.approx(expected, rel=1e-5)


def test_tokens_per_sec_and_mfu(fp32_run):
    """tokens/s = tokens per step / step time; MFU = tokens/s x FLOPs per token / peak."""
    from trainer.flops import peak_flops

    cfg, _, returned, saved, scalars = fp32_run
    per_step = BATCH * SEQ  # a decoder step reads B x T input tokens
    assert saved["tokens"] == STEPS * per_step
    peak = peak_flops(torch.device("cpu"), "fp32")  # cached in this process: what the run divided by
    fpt = saved["flops_per_token"]
    for s in range(1, STEPS + 1):
        tps, step_time = scalars["train/tokens_per_sec"][s], scalars["train/step_time_s"][s]
        assert tps * step_time == pytest.approx(per_step, rel=0.01), s
        assert scalars["train/mfu"][s] == pytest.approx(tps * fpt / peak, rel=1e-5), s
    assert saved["tokens_per_sec"] == pytest.approx(scalars["train/tokens_per_sec"][STEPS], rel=1e-6)
    assert saved["mfu"] == pytest.approx(saved["tokens_per_sec"] * fpt / peak, rel=1e-9)
    assert 0 < saved["mfu"] < 1
    assert returned["mfu"] == saved["mfu"]


def test_summary_splits_setup_and_train_time(fp32_run):
    """setup_time_s + train_time_s fit inside wall_time_s, and the train time covers every step."""
    _, _, _, saved, scalars = fp32_run
    for key in ("setup_time_s", "train_time_s", "wall_time_s"):
        assert key in saved, key
        assert saved[key] > 0, key
    steps_time = sum(scalars["train/step_time_s"][s] for s in range(1, STEPS + 1))
    assert saved["train_time_s"] >= steps_time * (1 - 1e-6)
    assert saved["setup_time_s"] + saved["train_time_s"] <= saved["wall_time_s"] + 1e-6


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


def test_peak_memory_is_this_runs_own(tmp_path):
    """A 1 GiB spike in this process before the run must not show up as the run's peak."""
    spike = torch.ones(2**28)  # 1 GiB, touched
    spike_peak = _rss_peak_mb()
    del spike
    run(compose_cfg("trainer.max_steps=2", "trainer.eval_every=2"), run_dir=str(tmp_path))
    peak = _summary(tmp_path)["peak_memory_mb"]
    assert 0 < peak < spike_peak - 700, (peak, spike_peak)


# ---------------------------------------------------------------------------------------------
# A non-finite loss, through the CLI


NONFINITE = ["optim.lr=1e30", "trainer.grad_clip=0", "schedule.warmup_steps=0", "trainer.checkpoint_every=1",
             "trainer.max_steps=9", "trainer.log_every=1", "trainer.eval_every=100"]


def _tiny_model(cfg):
    from models.build import build_model
    from trainer.data import VOCAB_SIZE

    return build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                       max_len=cfg.data.seq_len)


def test_non_finite_loss_cli_keeps_the_last_good_step(tmp_path):
    """lr=1e30: exit 3 naming the bad step; the newest checkpoint is the step before it, finite and
    bit-identical to the same run stopped cleanly there (trainer.steps_per_run)."""
    from trainer.data import BatchStream, load_corpus

    bad_dir, ref_dir = tmp_path / "bad", tmp_path / "ref"
    proc = run_cli(*tiny_cli_args(bad_dir, *NONFINITE))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "non-finite" in last, proc.stderr
    bad_step = int(re.search(r"step (\d+)", last).group(1))
    assert bad_step >= 2, last
    good = bad_step - 1

    names = sorted(p.name for p in (bad_dir / "checkpoints").iterdir())
    assert names[-1] == f"step_{good:08d}.pt", names
    assert all(re.fullmatch(r"step_\d{8}\.pt", n) for n in names), names  # no temporaries left
    assert not (bad_dir / "summary.json").exists() and not (bad_dir / "model.pt").exists()
    losses = read_scalars(str(bad_dir))["train/loss"]
    assert sorted(losses) == list(range(1, bad_step))  # every good step logged, the bad one not
    assert all(math.isfinite(v) for v in losses.values())

    ok = run_cli(*tiny_cli_args(ref_dir, *NONFINITE, f"trainer.steps_per_run={good}"))
    assert ok.returncode == 0, ok.stderr
    kept = torch.load(bad_dir / "checkpoints" / f"step_{good:08d}.pt", weights_only=True)
    ref = torch.load(ref_dir / "checkpoints" / f"step_{good:08d}.pt", weights_only=True)
    assert kept["step"] == ref["step"] == good
    assert kept["model"].keys() == ref["model"].keys()
    for k, v in kept["model"].items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, ref["model"][k]), k

    # And the step it refused really had a non-finite loss on those weights.
    cfg = compose_cfg(*NONFINITE)
    model = _tiny_model(cfg)
    model.load_state_dict(kept["model"])
    corpus = load_corpus(cfg.data, cfg.seed)
    blocks = BatchStream(corpus.train, cfg.trainer.batch_size, cfg.seed).batch(bad_step - 1)
    with torch.no_grad():
        logits = model(blocks[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert not torch.isfinite(loss)


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    """In process: after NonFiniteLoss the live model and optimizer are exactly as the last good
    step left them (the bad step's NaN gradients were never applied)."""
    import trainer.run as run_mod
    from trainer.errors import NonFiniteLoss

    live = {}
    import trainer.runs.model as model_mod

    real_build_model, real_build_optimizer = model_mod.build_model, run_mod.build_optimizer

    def build_model(*a, **kw):
        live["model"] = real_build_model(*a, **kw)
        return live["model"]

    def build_optimizer(*a, **kw):
        live["optimizer"] = real_build_optimizer(*a, **kw)
        return live["optimizer"]

    monkeypatch.setattr(model_mod, "build_model", build_model)
    monkeypatch.setattr(run_mod, "build_optimizer", build_optimizer)
    with pytest.raises(NonFiniteLoss) as err:
        run(compose_cfg(*NONFINITE), run_dir=str(tmp_path))
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    kept = torch.load(tmp_path / "checkpoints" / f"step_{bad_step - 1:08d}.pt", weights_only=True)
    for k, v in live["model"].state_dict().items():
        assert torch.equal(v, kept["model"][k]), k
    steps = {float(s["step"]) for s in live["optimizer"].state_dict()["state"].values()}
    assert steps == {float(bad_step - 1)}, steps
