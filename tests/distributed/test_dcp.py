"""Sharded (DCP) checkpoints of parallel=fsdp: real torchrun launches of 2 CPU processes (gloo).

Every rank writes its own shard; the checkpoint resumes on 1 process (single) and on 2 (fsdp)
and continues the uninterrupted run's loss curve; an incomplete `.dcp.tmp` is never listed or
loaded; a crafted `.metadata` is refused without running; `trainer.convert` gives the run's final
weights; an async save (`trainer.async_checkpoint=true`) is complete when the run ends.

Tolerances: resumed on the same 2 ranks the reduction order is the same, so losses agree to 1e-6
(they are bit-equal in practice). Resumed on 1 process, the first resumed step differs only by the
order of the fp32 sums (about log2(256 targets) x 2^-24 x loss ~ 5e-6 at most), and each later
step's gradients differ in their last bits, which Adam's normalized update can carry to an lr-sized
change of a near-zero-gradient weight: the 2e-4 bound of the DDP/FSDP-vs-one-process tests
(test_parallel.py) covers three such steps of this tiny model.
"""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_cli_args
from tb import read_scalars
from test_parallel import torchrun
from trainer.errors import ConfigError
from trainer.runs import checkpoints as ckpt

ARGS = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.threads=1", "model.dropout=0.0",
        "trainer.checkpoint_every=3", "trainer.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted 2-rank FSDP run of 6 steps, sharded checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    proc = torchrun(*tiny_cli_args(run_dir, *ARGS, "parallel=fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_every_rank_writes_its_shard(fsdp_run):
    directory = fsdp_run / "checkpoints"
    assert ckpt.list_checkpoints(str(directory)) == [str(directory / "step_00000003.dcp"),
                                                     str(directory / "step_00000006.dcp")]
    step3 = directory / "step_00000003.dcp"
    shards = sorted(p.name for p in step3.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    # No rank gathered the whole state: DCP's metadata says which file holds each chunk of every
    # tensor (model and Adam's moments); each rank's file holds its dim-0 chunk, about half.
    md = ckpt.dcp_metadata(str(step3))
    per_file = {name: 0 for name in shards}
    total = 0
    for fqn, tensor in md.state_dict_metadata.items():
        if tensor.size.numel() > 1:  # not Adam's scalar step count (every rank has one)
            total += tensor.size.numel()
            for chunk in tensor.chunks:
                where = next(info for index, info in md.storage_data.items()
                             if index.fqn == fqn and tuple(index.offset) == tuple(chunk.offsets))
                per_file[where.relative_path] += chunk.sizes.numel()
    weights = ckpt.full_model_state(str(step3))
    assert total == 3 * sum(v.numel() for v in weights.values())  # weights + exp_avg + exp_avg_sq
    assert sum(per_file.values()) == total
    for name, count in per_file.items():
        assert 0.4 * total < count < 0.6 * total, (name, count, total)
    extra = torch.load(step3 / "extra.pt", weights_only=True)
    assert extra["step"] == 3 and len(extra["rng"]) == 2 and "model" not in extra


def test_resume_on_one_and_on_two_processes(fsdp_run, tmp_path):
    start = str(fsdp_run / "checkpoints" / "step_00000003.dcp")
    one = run_cli(*tiny_cli_args(tmp_path / "one", *ARGS, f"trainer.resume={start}"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*tiny_cli_args(tmp_path / "two", *ARGS, "parallel=fsdp", f"trainer.resume={start}",
                                  "trainer.async_checkpoint=true"))
    assert two.returncode == 0, two.stderr[-3000:]
    saved = tmp_path / "two" / "checkpoints"  # the async save was completed and renamed before the exit
    assert ckpt.list_checkpoints(str(saved)) == [str(saved / "step_00000006.dcp")]
    assert not list(saved.glob("*.tmp"))
    assert "resuming from" in one.stderr and "parallel.kind='single'" in one.stderr
    full = read_scalars(str(fsdp_run))["train/loss"]
    a, b = read_scalars(str(tmp_path / "one"))["train/loss"], read_scalars(str(tmp_path / "two"))["train/loss"]
    assert sorted(a) == sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(full[step], abs=1e-6), step
        assert a[step] == pytest.approx(full[step], abs=2e-4), step


def test_incomplete_checkpoint_is_never_listed_or_loaded(fsdp_run, tmp_path):
    """A leftover `.dcp.tmp` (a save that died) and a directory without its metadata are skipped;
    a resume on one process continues from the newest complete one and rotation removes
    directories too."""
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir)
    directory = run_dir / "checkpoints"
    shutil.copytree(directory / "step_00000006.dcp", directory / "step_00000009.dcp.tmp")
    shutil.copytree(directory / "step_00000006.dcp", directory / "step_00000012.dcp")
    os.remove(directory / "step_00000012.dcp" / ".metadata")
    newest = str(directory / "step_00000006.dcp")
    assert ckpt.list_checkpoints(str(directory))[-1] == newest
    assert ckpt.find_resume("auto", str(directory)) == newest
    proc = run_cli(*tiny_cli_args(run_dir, *ARGS, "trainer.max_steps=7", "trainer.keep_checkpoints=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {newest} at step 6" in proc.stderr
    assert ckpt.list_checkpoints(str(directory)) == [newest, str(directory / "step_00000007.pt")]
    assert not (directory / "step_00000003.dcp").exists()  # rotated away, a directory
    assert (directory / "step_00000009.dcp.tmp" / "extra.pt").exists()  # leftovers are the user's


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_metadata_is_refused_without_running(fsdp_run, tmp_path, monkeypatch):
    path = tmp_path / "step_00000003.dcp"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000003.dcp", path)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="could run code"):
        ckpt.full_model_state(str(path))
    assert not (tmp_path / "pwned").exists()


def test_convert_gives_the_final_weights(fsdp_run, tmp_path):
    out = tmp_path / "full"
    proc = run_cli(f"run_dir={fsdp_run}", f"output={out}", module="trainer.convert")
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted, final = load_file(str(out / "model.safetensors")), load_file(str(fsdp_run / "model.safetensors"))
    assert converted.keys() == final.keys()
    for name, tensor in final.items():  # the step-6 checkpoint holds exactly the final weights
        assert torch.equal(converted[name], tensor), name
    pt = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(pt[k], final[k]) for k in final)
    assert (out / ".hydra" / "config.yaml").is_file()
    again = run_cli(f"run_dir={fsdp_run}", f"output={out}", module="trainer.convert")
    assert again.returncode == 2 and "already holds model.safetensors" in again.stderr
