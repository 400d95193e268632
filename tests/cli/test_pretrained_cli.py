"""Pretrained folders through the real CLI: a contradicting override, a pickle-only folder and an
unsupported family each get one `error:` sentence, exit 2 and no run dir; a tiny Hugging Face BERT
folder fine-tunes contrastively and the config the run records is the folder's architecture."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytest.importorskip("transformers")
from unit.test_pretrained import make_folder  # noqa: E402  (tests/ is on sys.path, as for conftest)

SMALL = ["data.seq_len=32", "trainer.batch_size=8", "trainer.max_steps=2", "trainer.eval_every=2",
         "trainer.eval_batches=1", "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.progress=false",
         "trainer.device=cpu", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return make_folder(tmp_path_factory, "bert")[0]


def _refused(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_contradicting_override_is_refused_before_any_work(bert_folder, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("model=encoder", f"model.init_from={bert_folder}", "model.d_model=256", *SMALL,
                   f"hydra.run.dir={run_dir}")
    _refused(proc, "model.d_model=256 contradicts the pretrained folder's hidden_size 32")
    assert not run_dir.exists()


def test_pickle_only_and_unsupported_family_are_refused(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    _refused(run_cli("model=encoder", f"model.init_from={pickled}", *SMALL, f"hydra.run.dir={tmp_path / 'a'}"),
             "pytorch_model.bin", "never unpickled")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    from safetensors.torch import save_file

    save_file({"word_embeddings.weight": torch.zeros(4, 4)}, str(other / "model.safetensors"))
    _refused(run_cli("model=encoder", f"model.init_from={other}", *SMALL, f"hydra.run.dir={tmp_path / 'b'}"),
             "model_type 'bloom' is not supported")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_hugging_face_folder_fine_tunes_and_the_run_records_its_architecture(bert_folder, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(f"model.init_from={bert_folder}", "objective=contrastive", "data=pairs", *SMALL,
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from trainer.runs.artifacts import read_run

    weights, cfg = read_run(str(run_dir))
    assert (cfg.model.arch, cfg.model.d_model, cfg.model.num_layers, cfg.model.d_ff) == ("encoder", 32, 2, 48)
    assert cfg.norm.placement == "post" and cfg.model.embed_norm and cfg.tokenizer.kind == "pretrained"
    assert weights["encoder.embed_norm.weight"].shape == (32,)
