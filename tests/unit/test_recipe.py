"""The training-recipe choices against hand or reference computations: optim=muon (torch.optim.Muon
+ AdamW as one optimizer), schedule=wsd, objective.z_loss, data.random_offsets, and their config
checks."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, run_cli, tiny_cli_args
from models.build import build_model
from trainer.config.validate import validate
from trainer.data.store import BatchStream, StoreBlocks
from trainer.errors import ConfigError
from trainer.objectives import build_objective
from trainer.objectives.base import cross_entropy_sum
from trainer.optim import MuonAdamW, build_optimizer, build_scheduler, decay_parameters, muon_parameters

VOCAB = 320


def _model(*overrides: str):
    cfg = compose_cfg(*overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB,
                            max_len=cfg.data.seq_len)


def _loss(model, seed: int) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    cfg, model = _model("optim=muon", "model.tie_embeddings=false", "model.bias=true")
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    muon_ids = {id(p) for p in opt.muon.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[i] for i in muon_ids)
    # Every block linear weight (qkv, out, up, down in each layer), nothing else.
    expected = sorted(n for n, p in model.named_parameters()
                      if ".blocks." in n and n.endswith(("qkv.weight", "out.weight", "up.weight", "down.weight")))
    assert muon_names == expected and len(expected) == 4 * cfg.model.num_layers
    adam = [p for g in opt.adamw.param_groups for p in g["params"]]
    assert {id(p) for p in adam} | muon_ids == {id(p) for p in model.parameters()}
    assert not {id(p) for p in adam} & muon_ids
    # AdamW keeps build_optimizer's decay rule: the embedding and untied head decay, biases/norms do not.
    decayed = {names[id(p)] for p in opt.adamw.param_groups[0]["params"]}
    assert decayed == {"embed.weight", "head.weight"}
    assert opt.adamw.param_groups[0]["weight_decay"] == cfg.optim.weight_decay
    assert opt.adamw.param_groups[1]["weight_decay"] == 0.0


def test_muon_adamw_steps_like_the_two_reference_optimizers_and_resumes_exactly():
    """Two scheduled steps of MuonAdamW == torch.optim.Muon on the block matrices + AdamW on the
    rest, built by hand on a copy; a state dict restored into a fresh one continues identically."""
    cfg, model = _model("optim=muon", "schedule=constant", "schedule.warmup_steps=2", "optim.muon_weight_decay=0.01")
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.schedule, 10)
    o = cfg.optim
    ref_muon = torch.optim.Muon(muon_parameters(ref), lr=o.muon_lr, momentum=o.muon_momentum,
                                weight_decay=o.muon_weight_decay, nesterov=True, ns_steps=5, adjust_lr_fn="original")
    mids = {id(p) for p in muon_parameters(ref)}
    decay, no_decay = decay_parameters(ref)
    ref_adam = torch.optim.AdamW([{"params": [p for p in decay if id(p) not in mids], "weight_decay": o.weight_decay},
                                  {"params": [p for p in no_decay if id(p) not in mids], "weight_decay": 0.0}],
                                 lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    for step in range(2):
        factor = (step + 1) / 2  # the warmup's factor, applied by hand to both references
        for g in ref_muon.param_groups:
            g["lr"] = o.muon_lr * factor
        for g in ref_adam.param_groups:
            g["lr"] = o.lr * factor
        assert opt.param_groups[0]["lr"] == pytest.approx(o.muon_lr * factor)
        assert opt.param_groups[-1]["lr"] == pytest.approx(o.lr * factor)
        _loss(model, step).backward()
        _loss(ref, step).backward()
        opt.step(), sched.step(), opt.zero_grad()
        ref_muon.step(), ref_adam.step(), ref_muon.zero_grad(), ref_adam.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        # fp32 AdamW (fused vs per-tensor: same math); Muon's NS in bf16 on identical inputs.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # Exact resume: a fresh optimizer loaded from the state dict takes the same next step.
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, cfg.optim, torch.device("cpu"))
    sched2 = build_scheduler(opt2, cfg.schedule, 10)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(sched.state_dict())
    for m, o_, s_ in ((model, opt, sched), (clone, opt2, sched2)):
        _loss(m, 5).backward()
        o_.step(), s_.step(), o_.zero_grad()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError):
        opt2.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_muon_update_is_the_orthogonalized_momentum():
    """Hand computation of Muon's first step on one matrix (Jordan et al. 2024): Nesterov momentum
    (1 + mu) g, 5 quintic Newton-Schulz iterations in bf16, scaled by sqrt(max(1, rows / cols))."""
    cfg, model = _model("optim=muon", "optim.muon_weight_decay=0")
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    w = opt.muon.param_groups[0]["params"][0]
    before = w.detach().clone()
    _loss(model, 0).backward()
    g = w.grad.detach().clone()
    opt.step()
    a, b, c = 3.4445, -4.7750, 2.0315
    mu = cfg.optim.muon_momentum
    x = (g + mu * ((1 - mu) * g - g)).bfloat16()  # Nesterov: g.lerp(buf, mu) with buf = (1 - mu) g
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(5):
        A = x @ x.T  # (rows, rows) Gram matrix of the wide orientation
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, one rounding to bf16 (as the reference)
        x = torch.addmm(x, B, x, beta=a)  # a x + B x
    x = x.T if tall else x
    expected = before - cfg.optim.muon_lr * math.sqrt(max(1, w.shape[0] / w.shape[1])) * x.float()
    update = (expected - before).abs().mean()
    # The same bf16 iterations: equal up to the rounding of the final fp32 add (and a bf16 ulp where
    # a GEMM's blocking differs), far tighter than any other update would give.
    assert (w.detach() - expected).abs().mean() < 0.01 * update
    assert torch.linalg.svdvals(x.float()).max() < 1.5  # orthogonalized: no direction blown up (Jordan: <~1.2)
    assert not torch.allclose(w.detach(), before - cfg.optim.muon_lr * g, atol=1e-4)  # not plain SGD


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_schedule_by_hand(shape):
    cfg = compose_cfg("schedule=wsd", "schedule.warmup_steps=2", "schedule.decay_fraction=0.4",
                      f"schedule.decay_shape={shape}", "schedule.min_lr_ratio=0.1")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, cfg.schedule, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    # warmup 1/2, 2/2; stable through step 5; the last 4 updates decay to 0.1 at step 9.
    ps = [0.25, 0.5, 0.75, 1.0]
    decay = [0.1 + 0.9 * (1 - (math.sqrt(q) if shape == "sqrt" else q)) for q in ps]
    expected = [2.0 * f for f in [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, *decay]]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_z_loss_by_hand_and_plain_cross_entropy_under_no_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 3
    target = torch.randint(0, 7, (3, 5), generator=g)
    coef = 1e-2
    ce, lse2 = 0.0, 0.0
    for row, t in zip(logits.reshape(-1, 7).tolist(), target.reshape(-1).tolist()):
        z = math.log(sum(math.exp(v) for v in row))
        ce += z - row[t]
        lse2 += z * z
    loss, correct = cross_entropy_sum(logits, target, z_loss=coef)
    assert loss.item() == pytest.approx(ce + coef * lse2, rel=1e-5)
    assert correct.item() == int((logits.argmax(-1) == target).sum())
    with torch.no_grad():
        assert cross_entropy_sum(logits, target, z_loss=coef)[0].item() == pytest.approx(ce, rel=1e-5)
    # The objective carries the coefficient from the config into its loss.
    obj = build_objective("clm", compose_cfg("objective.z_loss=0.01").objective)
    assert obj.z_loss == 0.01


def _stream_blocks(n: int = 7, width: int = 9) -> torch.Tensor:
    return torch.arange(n * width, dtype=torch.int64).view(n, width)


def test_random_offsets_cut_windows_of_the_token_stream():
    blocks = _stream_blocks()
    stream = BatchStream(blocks, batch_size=5, seed=3, random_offsets=True)
    flat = blocks.reshape(-1)
    seen = set()
    for step in (0, 1, 7):
        starts = stream.offsets(step)
        assert starts.min() >= 0 and starts.max() <= blocks.numel() - 9
        expected = torch.stack([flat[s:s + 9] for s in starts.tolist()])  # by hand: consecutive tokens
        assert torch.equal(stream.batch(step), expected)
        seen |= set(starts.tolist())
    assert len(seen) > 7  # not the 7 block starts: offsets fall inside blocks
    # A function of (seed, step) only: a fresh stream, asked out of order, gives the same batch;
    # another seed another one.
    assert torch.equal(BatchStream(blocks, 5, 3, random_offsets=True).batch(7), stream.batch(7))
    assert not torch.equal(BatchStream(blocks, 5, 4, random_offsets=True).batch(7), stream.batch(7))
    # The memory-mapped store reads the same windows (with rows before the split, as val follows train).
    mm = np.concatenate([np.zeros((2, 9), np.uint16), blocks.numpy().astype(np.uint16)])
    store = StoreBlocks(mm, 2, 2 + len(blocks))
    assert torch.equal(BatchStream(store, 5, 3, random_offsets=True).batch(7), stream.batch(7))
    # The default stays the fixed blocks.
    fixed = BatchStream(blocks, 5, 3).batch(0)
    assert all(int(r[0]) % 9 == 0 for r in fixed)


@pytest.mark.parametrize("overrides,world,needle", [
    (["optim=muon", "parallel=fsdp"], 2, "optim=muon cannot be combined with parallel=fsdp"),
    (["optim=muon", "optim.muon_adjust_lr=nope"], 1, "optim.muon_adjust_lr='nope'"),
    (["schedule=wsd", "schedule.decay_shape=cubic"], 1, "schedule.decay_shape='cubic'"),
    (["schedule=wsd", "schedule.decay_fraction=0"], 1, "schedule.decay_fraction=0"),
    (["model=encoder", "objective=contrastive", "objective.z_loss=1e-4"], 1, "objective.z_loss=0.0001"),
    (["objective.z_loss=-1"], 1, "objective.z_loss=-1"),
    (["model.logit_softcap=0"], 1, "model.logit_softcap=0"),
    (["data=hub", "data.name=x", "data.streaming=true", "data.random_offsets=true"], 1, "data.random_offsets"),
])
def test_recipe_choices_are_refused_in_one_sentence(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides), world_size=world, launched=world > 1)
    msg = str(e.value)
    assert needle in msg and msg.count(". ") == 0 and msg.endswith("."), msg


def test_recipe_choices_show_in_cfg_job(tmp_path):
    out = run_cli("--cfg", "job", *tiny_cli_args(tmp_path, "optim=muon", "schedule=wsd", "objective.z_loss=1e-4",
                                                 "data.random_offsets=true"))
    assert out.returncode == 0, out.stderr
    for line in ("name: muon", "muon_lr: 0.02", "muon_momentum: 0.95", "name: wsd", "decay_fraction: 0.2",
                 "decay_shape: linear", "z_loss: 0.0001", "random_offsets: true", "logit_softcap: null"):
        assert line in out.stdout, line
    assert isinstance(build_optimizer(_model("optim=muon")[1], compose_cfg("optim=muon").optim,
                                      torch.device("cpu")), MuonAdamW)


def test_relu2_feed_forward_by_hand():
    from models.blocks import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(8, 16, "relu2", bias=True)
    x = torch.randn(2, 3, 8)
    h = x @ ffn.up.weight.T + ffn.up.bias
    expected = (torch.clamp(h, min=0) ** 2) @ ffn.down.weight.T + ffn.down.bias
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


def test_logit_softcap_caps_every_logit_and_keeps_padding_rows_out():
    """c * tanh(z / c) of the uncapped logits, in forward and in KV-cached decoding; ids past
    num_tokens stay -inf (not -c)."""
    cfg, plain = _model("model.logit_softcap=null")
    capped_cfg, capped = _model("model.logit_softcap=2.0", "model.num_tokens=300")
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.embed.weight.mul_(50)  # logits of tens of nats, so the cap matters
        capped.embed.weight.mul_(50)
        x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        z = plain(x)
        out = capped(x)
        torch.testing.assert_close(out[..., :300], 2.0 * torch.tanh(z[..., :300] / 2.0), rtol=1e-5, atol=1e-5)
        assert out[..., :300].abs().max() <= 2.0 and z.abs().max() > 10  # tanh saturates to 1.0 in fp32
        assert torch.isinf(out[..., 300:]).all() and (out[..., 300:] < 0).all()
        cache = capped.new_cache()
        steps = [capped.decode(x[:, :6], cache)[:, -1]] + [capped.decode(x[:, i:i + 1], cache)[:, -1]
                                                           for i in range(6, 12)]
        torch.testing.assert_close(torch.stack(steps[1:], 1)[..., :300], out[:, 6:, :300], rtol=1e-4, atol=1e-4)
