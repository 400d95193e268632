"""README features end to end, each against reference values: the presets, `--cfg job`, SIGINT,
trainer.resume=<file>|never, trainer.compile, schedule=constant and the logged train/* tags."""
from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose_cfg, run_cli, tiny_cli_args
from models.build import build_model
from tb import read_scalars
from trainer.errors import ConfigError
from trainer.config.validate import validate
from trainer.data import VOCAB_SIZE, BatchStream, load_corpus
from trainer.objectives import build_objective
from trainer.run import run

PRESETS = ("tiny", "bench_ref", "rag_encoder")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_values_land_in_the_composed_config(preset):
    """Every value in conf/experiment/<preset>.yaml wins over the group defaults, and the result is valid."""
    values = _flatten(yaml.safe_load((Path(CONF) / "experiment" / f"{preset}.yaml").read_text()))
    assert values, preset
    cfg = compose_cfg(f"experiment={preset}", tiny=False)
    for key, value in values.items():
        assert OmegaConf.select(cfg, key) == value, (preset, key)
    default = compose_cfg(tiny=False)
    assert any(OmegaConf.select(default, k) != v for k, v in values.items()), "the preset changes nothing"
    validate(cfg)


def test_tiny_preset_trains_end_to_end(tmp_path):
    cfg = compose_cfg("experiment=tiny", "trainer.max_steps=4", "trainer.device=cpu", "trainer.progress=false",
                      tiny=False)
    summary = run(cfg, run_dir=str(tmp_path))
    d, layers, d_ff = 64, 2, 128  # conf/experiment/tiny.yaml
    # tied embedding + per block (fused qkv, out, up, down, two layernorms) + the final layernorm
    expected = VOCAB_SIZE * d + layers * (3 * d * d + d * d + 2 * d * d_ff + 2 * 2 * d) + 2 * d
    assert summary["parameters"] == expected
    assert summary["steps"] == 4 and summary["complete"]
    assert summary["tokens"] == 4 * 8 * 64  # steps x batch_size x seq_len of the preset
    assert math.isfinite(summary["eval/loss"]) and summary["eval/loss"] < math.log(VOCAB_SIZE) + 0.5
    assert sorted(read_scalars(str(tmp_path))["train/loss"]) == [4]  # log_every=5 > 4: logged at the end
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004.pt"]
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights["embed.weight"].shape == (VOCAB_SIZE, d)
    assert {k.split(".")[2] for k in weights if k.startswith("decoder.blocks.")} == {"0", "1"}


# ---------------------------------------------------------------- the CLI: --cfg job, SIGINT


def test_cli_cfg_job_prints_the_composed_config():
    proc = run_cli("--cfg", "job", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "d_model: 192" in proc.stdout and "run dir:" not in proc.stderr  # printed, not trained
    printed = yaml.safe_load(proc.stdout)
    assert printed == OmegaConf.to_container(compose_cfg(tiny=False), resolve=False)
    assert printed["model"]["arch"] == "decoder" and printed["attention"]["kind"] == "flash"


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=100000",
                         "trainer.eval_every=100000")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until training has started
        lines.append(line)
        if "starting" in line:
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "SIGINT" in rest and "checkpoint saved" in rest and "Traceback" not in rest, rest
    assert (run_dir / "checkpoints").is_dir(), "no checkpoint was saved"
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].suffix == ".pt"
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert stopped_at > 0
    assert torch.load(ckpts[0], weights_only=True)["step"] == stopped_at


# ---------------------------------------------------------------- trainer.resume=<file> | never

RESUME = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5",
          "trainer.eval_every=100"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("base")
    run(compose_cfg(*RESUME), run_dir=str(run_dir))
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == \
        ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    return run_dir


def test_resume_from_a_checkpoint_file_continues_from_that_step(base_run, tmp_path):
    """trainer.resume=<file>: not the newest checkpoint, exactly that one; the curve continues."""
    path = base_run / "checkpoints" / "step_00000002.pt"
    summary = run(compose_cfg(*RESUME, f"trainer.resume={path}"), run_dir=str(tmp_path))
    assert summary["steps"] == 6
    base, resumed = read_scalars(str(base_run)), read_scalars(str(tmp_path))
    assert sorted(resumed.get("train/loss", {})) == [3, 4, 5, 6], "did not resume from step 2"
    for step in (3, 4, 5, 6):
        assert resumed["train/loss"][step] == pytest.approx(base["train/loss"][step], abs=1e-5), step


def test_resume_never_refuses_a_run_dir_with_checkpoints(base_run):
    before = _digest(base_run / "checkpoints")
    events = sorted(p.name for p in base_run.glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError) as err:
        run(compose_cfg(*RESUME, "trainer.resume=never"), run_dir=str(base_run))
    text = str(err.value)
    assert "\n" not in text and "trainer.resume=never" in text and str(base_run / "checkpoints") in text, text
    assert _digest(base_run / "checkpoints") == before
    assert sorted(p.name for p in base_run.glob("events.out.tfevents.*")) == events  # nothing started


# ---------------------------------------------------------------- schedule=constant and the train/* tags


def test_constant_schedule_accuracy_and_step_time(make_cfg, tmp_path):
    """train/lr is the lr each logged step used: lr * min(1, s / warmup) for 1-based step s;
    train/accuracy is correct predictions / targets over the logging window (recounted here from
    the checkpointed weights); train/step_time_s is the window's time per step, consistent with
    train/tokens_per_sec."""
    cfg = make_cfg("schedule=constant", "schedule.warmup_steps=4", "optim.lr=1e-3", "trainer.max_steps=8",
                   "data.random_offsets=false",  # the accuracy is recounted from the store's fixed blocks
                   "trainer.log_every=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10",
                   "trainer.eval_every=100")
    summary = run(cfg, run_dir=str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    assert sorted(scalars["train/lr"]) == [2, 4, 6, 8]
    for s in (2, 4, 6, 8):  # warmup, then flat: no decay at all (a cosine would be at 0.23x by step 8)
        assert scalars["train/lr"][s] == pytest.approx(1e-3 * min(1.0, s / 4), rel=1e-6), s

    tokens_per_step = cfg.trainer.batch_size * cfg.data.seq_len
    for s in (2, 4, 6, 8):
        step_time, tps = scalars["train/step_time_s"][s], scalars["train/tokens_per_sec"][s]
        assert step_time > 0 and tokens_per_step / step_time == pytest.approx(tps, rel=0.01), s

    # Recount steps 3 and 4 (the window logged at step 4) from the weights they started from.
    corpus = load_corpus(cfg.data, cfg.seed)
    stream = BatchStream(corpus.train, cfg.trainer.batch_size, cfg.seed)
    objective = build_objective("clm", cfg.objective)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    correct = targets = 0
    loss = 0.0
    for index in (2, 3):  # 0-based step index: starts from the checkpoint of 1-based step `index`
        payload = torch.load(tmp_path / "checkpoints" / f"step_{index:08d}.pt", weights_only=True)
        model.load_state_dict(payload["model"])
        batch = objective.prepare(stream.batch(index), torch.Generator())
        with torch.no_grad():
            logits = model(batch["x"])
        correct += int((logits.argmax(-1) == batch["y"]).sum())
        targets += batch["y"].numel()
        loss += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum"))
    assert targets == 2 * tokens_per_step
    accuracy = scalars["train/accuracy"][4]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(correct / targets, abs=0.5 / targets), (accuracy, correct, targets)
    assert scalars["train/loss"][4] == pytest.approx(loss / targets, abs=1e-4)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["train/accuracy"] == pytest.approx(scalars["train/accuracy"][8], rel=1e-6)
    assert summary["train/accuracy"] == saved["train/accuracy"]
