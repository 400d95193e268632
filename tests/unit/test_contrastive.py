"""Contrastive objective: pooling, global-batch negatives under gradient accumulation (GradCache),
the learned temperature, and the loss against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from models.build import build_model
from trainer.objectives.contrastive import Contrastive, apply_learned_temperature, info_nce
from trainer.retrieval.embedding import pool

PAD = 256


class _Recorder(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of every gradient it is asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None})
        return super().step(closure)


def _loop(cfg, model, blocks, objective, grad_accum, precision="fp32"):
    from trainer.data import BatchStream
    from trainer.distributed import Dist
    from trainer.loop import Loop
    from trainer.metrics import Logger
    from trainer.optim import build_scheduler
    from trainer.precision import build_scaler

    opt = _Recorder(model.parameters())
    tcfg = cfg.trainer.copy()
    tcfg.grad_accum = grad_accum
    return Loop(model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg.schedule, 10),
                scaler=build_scaler(precision, torch.device("cpu")), objective=objective,
                stream=BatchStream(blocks, 8, 0), evaluators=[], gen=torch.Generator().manual_seed(5),
                device=torch.device("cpu"), precision=precision, dist=Dist(), logger=Logger("", False, 10, 0, False),
                cfg=tcfg, mfu=lambda t: 0.0, save=lambda s: None, stop_signal=lambda: 0)


def _pair_blocks(n: int, length: int, seed: int) -> torch.Tensor:
    """(n, 2, length) query/document rows of random bytes, right-padded to random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (n, 2, length), generator=g)
    lengths = torch.randint(3, length + 1, (n, 2), generator=g)
    rows[torch.arange(length)[None, None, :] >= lengths[..., None]] = PAD
    return rows


@pytest.mark.parametrize("data,learn,pooling", [("blocks", False, "mean"), ("pairs", True, "mean"),
                                                 ("pairs", False, "cls")])
def test_grad_accum_gives_the_whole_batch_loss_and_gradients(data, learn, pooling):
    """grad_accum=4 (GradCache) and grad_accum=1 give the same step-1 loss and the same gradient
    for every parameter (learned temperature included), to 1e-6. Splitting the batch into
    independent per-micro-batch losses, as a plain loop would, changes both."""
    cfg = compose_cfg("model=encoder", "objective=contrastive", f"objective.pooling={pooling}")
    blocks = (torch.randint(0, 256, (40, 33), generator=torch.Generator().manual_seed(1)) if data == "blocks"
              else _pair_blocks(40, 24, 1))
    results = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32)
        if learn:
            apply_learned_temperature(model, 0.07)
        from trainer.loop import train_step

        lp = _loop(cfg, model, blocks, Contrastive(0.05, pooling, PAD, mini_batches=accum), accum)
        out = train_step(lp, 0)
        names = {id(p): n for n, p in model.named_parameters()}
        results.append((float(out["loss_sum"]), {names[k]: v for k, v in lp.optimizer.grads[0].items()}))
    (loss1, g1), (loss4, g4) = results
    assert loss4 == pytest.approx(loss1, abs=1e-5)
    assert g1.keys() == g4.keys() and (not learn or "logit_scale" in g1)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)
    # The plain per-micro-batch loss sees only 2 negatives per query: a clearly different number.
    obj = Contrastive(0.05, pooling, PAD)
    batch = obj.prepare(lp.stream.batch(0), torch.Generator().manual_seed(5))
    with torch.no_grad():
        split = sum(float(obj.loss(model, {k: v[i:i + 2] for k, v in batch.items()})[0]) for i in range(0, 8, 2))
    assert abs(split - loss1) > 0.5


def test_info_nce_equals_a_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    d = F.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    loss, correct = info_nce(q, d, 20.0)
    expected = 0.0
    for i in range(3):
        s = [20.0 * float(q[i] @ d[j]) for j in range(3)]
        expected += -(s[i] - math.log(sum(math.exp(x) for x in s)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    top = [max(range(3), key=lambda j: float(q[i] @ d[j])) for i in range(3)]
    assert int(correct) == sum(t == i for i, t in enumerate(top))


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])


def test_padded_rows_embed_like_unpadded_ones():
    """A query embedded inside a padded batch equals the same query embedded alone (the padding
    is masked out of attention and of the mean)."""
    cfg = compose_cfg("model=encoder", "objective=contrastive")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=384, max_len=32).eval()
    obj = Contrastive(0.05, "mean", PAD)
    rows = _pair_blocks(6, 20, 3)
    batch = obj.prepare(rows, torch.Generator())
    with torch.no_grad():
        together = obj.embed(model, batch["a"], batch["a_mask"])
        for i in range(6):
            n = int(batch["a_mask"][i].sum())
            alone = obj.embed(model, batch["a"][i:i + 1, :n], None)
            torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)
