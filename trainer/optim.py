"""Optimizers (AdamW; Muon for the blocks' matrices with AdamW for the rest) and the learning-rate
schedules (warmup + cosine, constant, warmup-stable-decay)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from models.transformer import Transformer
from models.transformer import Stack

OPTIMIZERS = ("adamw", "muon")  # optim=<name>
SCHEDULES = ("cosine", "constant", "wsd")  # schedule=<name>
DECAY_SHAPES = ("linear", "sqrt")  # schedule=wsd: schedule.decay_shape
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # optim=muon: optim.muon_adjust_lr (torch.optim.Muon's)

def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed) by what each parameter is.

    The rule (GPT-2 / nanoGPT, BERT): weight decay applies to matmul weights, i.e. the `weight`
    of every `nn.Linear` (QAT's fake-quant linears and an untied LM head included), and to the
    token embedding (tied to the head). Everything else is not decayed: norm scales and shifts,
    biases, and position parameters (learned position tables, T5's relative-bias table), which
    are lookup tables of offsets, not matmuls. Decided by module type, never by tensor rank.
    Each parameter appears once (tied weights are shared, wrappers like DDP/FSDP/compile are seen
    through).
    """

    decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            decay_ids.add(id(module.weight))
        elif isinstance(module, Transformer) and module.embed is not None:  # a pipeline stage may not hold it
            decay_ids.add(id(module.embed.weight))
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(p)
    return decay, no_decay

def _adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    kinds = {type(p).__name__ == "DTensor" for g in groups for p in g["params"]}
    if len(kinds) > 1:  # tensor parallel: DTensor shards beside replicated tensors; the multi-tensor
        return torch.optim.AdamW(groups, foreach=False, **kw)  # kernels take one kind per call
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported here (device, dtype or DTensor)
        return torch.optim.AdamW(groups, foreach=True, **kw)

def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names, over every trainable parameter of `model`.

    adamw: AdamW with weight decay on matmul weights and the token embedding only
    (`decay_parameters`). muon: `MuonAdamW` (Muon for the blocks' 2-D linear weights, AdamW as
    above for everything else). AdamW uses the fused kernel (one pass over all parameters) where
    this torch has it for the device, otherwise the multi-tensor `foreach` path; tensor parallel
    (DTensor shards beside plain replicated parameters) the per-parameter path.
    """
    if getattr(cfg, "name", "adamw") == "muon":
        return MuonAdamW(model, cfg)
    decay, no_decay = decay_parameters(model)
    return _adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "weight_decay": 0.0}], cfg)

def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: the `weight` of every `nn.Linear` inside a block stack
    (attention q/kv/qkv/out, feed-forward up/down), each a 2-D matrix.

    The split of modded-nanogpt (Jordan et al. 2024): the token embedding, an untied LM head,
    norms, biases and position parameters are not hidden-layer matrices and stay with AdamW. Each
    parameter once (tied weights shared; DDP/compile wrappers seen through).
    """

    ids: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Stack):
            for sub in module.modules():
                if isinstance(sub, nn.Linear) and sub.weight.requires_grad:
                    ids.setdefault(id(sub.weight), sub.weight)
    return list(ids.values())

class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
    PyTorch's `torch.optim.Muon`) on the blocks' linear weights, AdamW on every other parameter,
    as one optimizer.

    Muon keeps a (Nesterov) momentum of each matrix's gradient and steps along its orthogonalized
    form (5 Newton-Schulz iterations: singular values pushed to ~1), scaled by
    `optim.muon_adjust_lr` ("original": sqrt(max(1, rows / cols)), Keller Jordan's). A fused QKV
    projection is orthogonalized as the one (H + 2 Hkv) Dh x D matrix it is. The other parameters
    get `build_optimizer`'s AdamW (decay on the token embedding / an untied head, none on norms,
    biases, positions) at `optim.lr`.

    `param_groups` are the two inner optimizers' groups themselves (Muon's first, with lr
    `optim.muon_lr`), so a LambdaLR schedule scales both by the same factor, a GradScaler unscales
    every gradient and `zero_grad` clears them all. `state_dict` holds both inner state dicts.

    Raises:
        ValueError: the model has no block matrix for Muon (nothing for it to do).
    """

    def __init__(self, model: nn.Module, cfg):
        matrices = muon_parameters(model)
        if not matrices:
            raise ValueError("optim=muon found no linear weight inside the model's blocks to update")
        muon_ids = {id(p) for p in matrices}
        decay, no_decay = decay_parameters(model)
        self.muon = torch.optim.Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                     weight_decay=cfg.muon_weight_decay, nesterov=cfg.muon_nesterov,
                                     ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr)
        self.adamw = _adamw([{"params": [p for p in decay if id(p) not in muon_ids], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in no_decay if id(p) not in muon_ids], "weight_decay": 0.0}], cfg)
        super().__init__([p for g in self._groups() for p in g["params"]], {})
        self._link()

    def _groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def _link(self) -> None:
        # The same dicts as the inner optimizers': an lr set here (by a scheduler) is the one they use.
        self.param_groups = self._groups()

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on the matrices and one AdamW step on the rest."""
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """{"muon": Muon's state dict, "adamw": AdamW's} (momentum buffers, moments, groups)."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore both inner optimizers; KeyError for a state dict of another optimizer."""
        if set(state_dict) != {"muon", "adamw"}:
            raise KeyError("not an optim=muon state dict (it has no 'muon' and 'adamw' parts)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link()  # load_state_dict replaced the inner group dicts

def warmup_steps(cfg, max_steps: int) -> int:
    """Warmup length in steps: `cfg.warmup_steps` when set, else `round(cfg.warmup_fraction *
    max_steps)` (so a short run or sweep warms up over the same share of itself as a long one)."""
    steps, fraction = getattr(cfg, "warmup_steps", None), getattr(cfg, "warmup_fraction", None)
    if steps is not None:
        return int(steps)
    return int(round((fraction or 0.0) * max_steps))

def wsd_factor(step: int, max_steps: int, warmup: int, decay_fraction: float, shape: str, floor: float) -> float:
    """The warmup-stable-decay multiplier of the lr of update `step` (0-based).

    Hu et al. 2024 (MiniCPM) / Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations"): linear warmup over `warmup` steps, then the peak lr, then
    over the last D = round(decay_fraction * max_steps) updates a decay to `floor` reached by the
    last update: with p = (step - (max_steps - D) + 1) / D in (0, 1], the factor is
    floor + (1 - floor) * (1 - p) ("linear") or floor + (1 - floor) * (1 - sqrt(p)) ("sqrt", the
    1-sqrt shape Hägele et al. found best). Where warmup and decay overlap the smaller factor wins.
    """
    warm = (step + 1) / warmup if step < warmup else 1.0
    span = max(1, int(round(decay_fraction * max_steps)))
    p = (step - (max_steps - span) + 1) / span
    if p <= 0:
        return warm
    p = min(p, 1.0)
    left = 1.0 - (math.sqrt(p) if shape == "sqrt" else p)
    return min(warm, floor + (1.0 - floor) * left)

def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (`warmup_steps`), then cosine decay to `min_lr_ratio * lr`, constant, or (wsd)
    stable then decayed over the last `decay_fraction` of the run (`wsd_factor`).

    The lr of step s (0-based) is lr * (s + 1) / W during the W warmup steps; then for cosine
    lr * (r + (1 - r) * (1 + cos(pi * p)) / 2) with p = (s - W) / (max_steps - W) capped at 1.
    Every parameter group is scaled by the same factor (optim=muon: Muon's and AdamW's lrs alike).
    """
    warmup = warmup_steps(cfg, max_steps)
    floor = getattr(cfg, "min_lr_ratio", 0.0)

    def factor(step: int) -> float:
        if cfg.name == "wsd":
            return wsd_factor(step, max_steps, warmup, cfg.decay_fraction, cfg.decay_shape, floor)
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
