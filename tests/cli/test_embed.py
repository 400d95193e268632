"""`python -m trainer.embed`: the vectors it writes are the encoder's own pooled, L2-normalised
outputs, one per input text and in input order; bf16 and dynamic_int8 stay close; bad input is
one sentence (exit 2) and leaves no output file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_cli_args

TEXTS = ["def add(a, b):\n    return a + b".replace("\n", " "),
         "Return the sum of two numbers.",
         "",  # an empty line is a text too: BOS + EOS
         "x" * 200,  # longer than data.seq_len: cut, keeping EOS
         "héllo wörld — unicode ✓",
         "short"]
RUN_ARGS = ["model=encoder", "objective=contrastive", "data=pairs", "trainer.max_steps=2", "trainer.eval_every=2",
            "trainer.checkpoint_every=2", "model.dropout=0.0"]


def _embed(*args: str):
    return run_cli(*args, module="trainer.embed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One contrastive encoder run and one decoder run, trained once for the module."""
    base = tmp_path_factory.mktemp("embed_runs")
    enc, dec = base / "enc", base / "dec"
    proc = run_cli(*tiny_cli_args(enc, *RUN_ARGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*tiny_cli_args(dec, "trainer.max_steps=1", "trainer.eval_every=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"enc": enc, "dec": dec}


def _reference(run_dir, texts: list[str]) -> np.ndarray:
    """Each text alone (no batch, no padding): BOS + bytes + EOS cut to seq_len with EOS kept,
    the model's token states mean-pooled over every position, then L2-normalised."""
    from trainer.retrieval.embedding import embed
    from trainer.runs.artifacts import load_model

    model, tok, cfg = load_model(str(run_dir))
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t.encode("utf-8"), bos=True, eos=True)
            if len(ids) > cfg.data.seq_len:
                ids = ids[:cfg.data.seq_len - 1] + [tok.eos_id]
            v = embed(model, torch.tensor([ids]), None, cfg.objective.pooling)[0]
            out.append(v.numpy())
    return np.stack(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(runs):
    return _reference(runs["enc"], TEXTS)


def test_npy_from_txt_equals_the_pooled_normalised_model_outputs(runs, reference, tmp_path):
    """A .txt input (one text per line, an empty line included) gives one unit-norm row per
    line, in input order, equal to the model's pooled L2-normalised output per text (1e-5)."""
    inp, out = tmp_path / "texts.txt", tmp_path / "vecs.npy"
    inp.write_bytes("\n".join(TEXTS).encode("utf-8") + b"\n")
    proc = _embed(f"run_dir={runs['enc']}", f"input={inp}", f"output={out}", "batch_size=4", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vecs = np.load(out)
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs, reference, atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1], atol=1e-3)  # distinct texts, distinct vectors


def test_parquet_from_jsonl_keeps_rows_texts_and_vectors(runs, reference, tmp_path):
    """A .jsonl input (the `field` of each record) written to .parquet: columns row, text and
    embedding, one record per input record in order, vectors equal to the reference (1e-5)."""
    import pyarrow.parquet as pq

    inp, out = tmp_path / "texts.jsonl", tmp_path / "vecs.parquet"
    inp.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    proc = _embed(f"run_dir={runs['enc']}", f"input={inp}", "field=body", f"output={out}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out).to_pydict()
    assert table["row"] == list(range(len(TEXTS)))
    assert table["text"] == TEXTS
    vecs = np.array(table["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vecs, reference, atol=1e-5)


@pytest.mark.parametrize("extra,min_cos", [("precision=bf16", 0.99), ("quantize=dynamic_int8", 0.95)])
def test_bf16_and_dynamic_int8_stay_close_to_fp32(runs, reference, tmp_path, extra, min_cos):
    """precision=bf16 and quantize=dynamic_int8 give unit vectors whose cosine with the fp32
    reference exceeds 0.99 and 0.95 for every text, and are not bit-identical to it (the
    variant really ran)."""
    inp, out = tmp_path / "texts.txt", tmp_path / "vecs.npy"
    inp.write_bytes("\n".join(TEXTS).encode("utf-8") + b"\n")
    proc = _embed(f"run_dir={runs['enc']}", f"input={inp}", f"output={out}", extra, "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vecs = np.load(out)
    assert vecs.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    cos = _cosines(vecs, reference)
    assert cos.min() > min_cos, cos
    assert np.abs(vecs - reference).max() > 1e-6


@pytest.mark.parametrize("case", ["missing_run", "decoder_run", "empty_file", "bad_extension", "jsonl_no_field"])
def test_bad_input_is_one_sentence_and_writes_nothing(runs, tmp_path, case):
    """Each bad input exits 2 with one `error:` sentence naming the bad value, no traceback,
    and no output file."""
    good = tmp_path / "ok.txt"
    good.write_text("a text\n")
    out = tmp_path / "vecs.npy"
    run_dir, inp, named = runs["enc"], good, None
    if case == "missing_run":
        run_dir = tmp_path / "no_such_run"
        named = "no_such_run"
    elif case == "decoder_run":
        run_dir, named = runs["dec"], "model=decoder"
    elif case == "empty_file":
        inp = tmp_path / "empty.txt"
        inp.write_text("")
        named = "empty.txt"
    elif case == "bad_extension":
        out, named = tmp_path / "vecs.csv", "vecs.csv"
    else:
        inp = tmp_path / "recs.jsonl"
        inp.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
        named = "line 2"
    proc = _embed(f"run_dir={run_dir}", f"input={inp}", f"output={out}", "progress=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].rstrip().endswith("."), proc.stderr
    assert named in errors[0], errors[0]
    assert not out.exists() and not list(tmp_path.glob("vecs*"))
