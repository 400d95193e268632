"""run(cfg) end to end on CPU: learning, resume parity, outputs, logging."""
from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from tb import read_accumulator, read_scalars
from trainer.run import run

LEARN = ["model.d_model=64", "model.num_heads=4", "model.d_ff=256", "data.seq_len=64", "trainer.batch_size=16",
         "trainer.max_steps=150", "trainer.eval_every=150", "trainer.eval_batches=4", "trainer.log_every=25",
         "trainer.checkpoint_every=1000", "optim.lr=3e-3", "schedule.warmup_steps=10"]


def test_default_corpus_is_learned(make_cfg, tmp_path):
    """Held-out loss on stdlib files the model never saw falls well below uniform (ln 256 = 5.55)."""
    summary = run(make_cfg(*LEARN), run_dir=str(tmp_path))
    assert summary["eval/loss"] < 3.6, summary["eval/loss"]
    assert summary["eval/accuracy"] > 0.2
    assert math.isclose(summary["eval/perplexity"], math.exp(summary["eval/loss"]), rel_tol=1e-6)


def test_decoder_does_not_beat_entropy_of_random_text(make_cfg, tmp_path):
    """On i.i.d. uniform text over 16 symbols nothing is predictable beyond ln 16 = 2.77 nats:
    a decoder that peeked at the future would go well below it."""
    rng = random.Random(0)
    path = tmp_path / "random.txt"
    path.write_text("".join(rng.choice("abcdefghijklmnop") for _ in range(120_000)))
    cfg = make_cfg(*LEARN, "data=text", f"data.files=[{path}]", "trainer.max_steps=120")
    summary = run(cfg, run_dir=str(tmp_path / "run"))
    entropy = math.log(16)
    assert summary["eval/loss"] > entropy - 0.03, summary["eval/loss"]
    assert summary["eval/loss"] < entropy + 0.25, "it should at least learn the 16-symbol distribution"


@pytest.mark.parametrize("extra", [[], ["model=encoder", "model.dropout=0.1"], ["model=encoder_decoder"],
                                   ["precision=bf16", "trainer.grad_accum=2"],
                                   ["optim=muon", "schedule=wsd", "objective.z_loss=1e-4", "data.random_offsets=true",
                                    "model.activation=relu2", "model.logit_softcap=15", "model.qk_norm=true"]])
def test_resume_continues_the_same_curve(make_cfg, tmp_path, extra):
    """A run interrupted after 5 steps and resumed logs the same per-step losses as an
    uninterrupted run (to 1e-6, also bf16): weights, optimizer, schedule, RNGs and data position restored."""
    common = ["trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=4", "trainer.checkpoint_every=4",
              *extra]
    full = run(make_cfg(*common), run_dir=str(tmp_path / "full"))
    part = run(make_cfg(*common, "trainer.steps_per_run=5"), run_dir=str(tmp_path / "split"))
    assert part["steps"] == 5 and not part["complete"]
    resumed = run(make_cfg(*common), run_dir=str(tmp_path / "split"))
    assert resumed["steps"] == 12 and resumed["complete"]
    a, b = read_scalars(str(tmp_path / "full")), read_scalars(str(tmp_path / "split"))
    assert sorted(b["train/loss"]) == list(range(1, 13))
    tol = 1e-6  # resume is exact: same weights, optimizer, schedule, RNG streams and data position
    for step in range(1, 13):
        assert a["train/loss"][step] == pytest.approx(b["train/loss"][step], abs=tol), step
    for step in (4, 8, 12):
        assert a["eval/loss"][step] == pytest.approx(b["eval/loss"][step], abs=tol)
    assert full["eval/loss"] == pytest.approx(resumed["eval/loss"], abs=tol)


def test_run_dir_outputs_and_tensorboard(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.keep_checkpoints=1"), run_dir=str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
                "eval/loss", "eval/accuracy", "eval/perplexity"):
        assert tag in scalars, tag
    assert sorted(scalars["train/loss"]) == [2, 4, 6]
    assert sorted(scalars["eval/loss"]) == [3, 6]
    # train/lr at step s is the lr step s's update used: warmup 2 steps, then cosine from 2e-3
    # towards min_lr_ratio 0.1 over steps 3..6 (0-based update i = s - 1, progress (i - 2) / 4).
    def used(s: int) -> float:
        i = s - 1
        return 2e-3 * ((i + 1) / 2 if i < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 4)))

    assert [scalars["train/lr"][s] for s in (2, 4, 6)] == pytest.approx([used(2), used(4), used(6)], rel=1e-6)
    assert used(4) == pytest.approx(2e-3 * (0.1 + 0.45 * (1 + math.sqrt(0.5))))
    acc = read_accumulator(str(tmp_path))
    assert "config/text_summary" in acc.Tags()["tensors"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "d_model: 32" in config_text and "arch: decoder" in config_text
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["attention"].string_value == "flash" and hparams["model.d_model"].number_value == 32
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ckpts == ["step_00000006.pt"], ckpts  # keep_checkpoints=1 pruned step 3
    with open(tmp_path / "summary.json") as f:
        saved = json.load(f)
    for key in ("eval/loss", "train/loss", "parameters", "tokens_per_sec", "wall_time_s", "peak_memory_mb",
                "components", "mfu"):
        assert key in saved, key
    assert saved["components"]["model"] == "decoder" and saved["components"]["objective"] == "clm"
    weights = torch.load(tmp_path / "model.pt")
    assert "embed.weight" in weights and saved["parameters"] == summary["parameters"]


@pytest.mark.parametrize("arch,objective,uniform", [("encoder", "mlm", True), ("encoder_decoder", "span", True),
                                                     ("encoder", "contrastive", False)])
def test_each_objective_learns(make_cfg, tmp_path, arch, objective, uniform):
    # The recipes themselves (masking statistics, T5 structure, InfoNCE) are checked against their
    # reference definitions in tests/unit/test_objectives.py; this checks that each one trains.
    steps, window = (60, 5) if uniform else (150, 25)  # contrastive losses are noisy: 25-step means
    cfg = make_cfg(f"model={arch}", f"objective={objective}", "model.d_model=64", "model.d_ff=128",
                   "data.seq_len=64", "trainer.batch_size=16", f"trainer.max_steps={steps}",
                   f"trainer.eval_every={steps}", f"trainer.log_every={window}",
                   f"optim.lr={3e-3 if uniform else 1e-3}", "trainer.checkpoint_every=1000")
    summary = run(cfg, run_dir=str(tmp_path))
    losses = read_scalars(str(tmp_path))["train/loss"]
    assert losses[steps] < losses[window] - 0.2, losses
    if uniform:
        assert summary["eval/loss"] < math.log(256) - 1.0
    else:  # contrastive: the in-batch InfoNCE loss falls clearly below chance, ln 16
        assert losses[steps] < math.log(16) - 0.2


def test_fp16_uses_grad_scaler(make_cfg, tmp_path):
    summary = run(make_cfg("precision=fp16"), run_dir=str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    assert "train/loss_scale" in scalars and "train/skipped_steps" in scalars
    assert summary["components"]["precision"] == "fp16"
    payload = torch.load(tmp_path / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert payload["scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint


def test_non_finite_loss_stops_and_keeps_last_checkpoint(make_cfg, tmp_path):
    """lr=1e30 blows the weights up after step 1; the NaN loss of step 2 stops the run before
    its optimizer step, and the checkpoint written before it survives."""
    from trainer.errors import NonFiniteLoss

    cfg = make_cfg("optim.lr=1e30", "trainer.grad_clip=0", "schedule.warmup_steps=0",
                   "trainer.checkpoint_every=1", "trainer.max_steps=9")
    with pytest.raises(NonFiniteLoss, match="non-finite at step"):
        run(cfg, run_dir=str(tmp_path))
    kept = sorted(os.listdir(tmp_path / "checkpoints"))
    assert kept and all(name.endswith(".pt") for name in kept)
    assert not (tmp_path / "summary.json").exists()
