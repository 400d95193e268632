"""Pipeline parallelism as a model transform: the decoder's blocks split into one stage per rank,
trained through `torch.distributed.pipelining` with a GPipe (Huang et al. 2019) or 1F1B
(Narayanan et al. 2019, PipeDream-Flush) schedule over `trainer.grad_accum` micro-batches.

Stage s of S holds blocks [s*L/S, (s+1)*L/S) (torchtitan's manual split: the other blocks are
dropped, the kept ones keep their names, so a stage's state_dict is a slice of the whole model's
and its DCP checkpoint resumes under any layout). Stage 0 also holds the token embedding (and any
embedding norm), the last stage the final norm and the head; with tied embeddings the last stage
holds its own copy of the embedding. Parameters held by several stages (the tied embedding, the
position module's) get their gradients summed over the stages after each backward, so the copies
stay equal. Evaluation runs the stages in order on whole batches (point-to-point sends) and
broadcasts the last stage's logits, so every rank scores the same rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.objectives.base import cross_entropy_sum

PP_SCHEDULES = ("gpipe", "1f1b")  # parallel.pp_schedule


class _Stage(nn.Module):
    """One stage's forward: (tokens on stage 0 | hidden states) -> (hidden states | logits)."""

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.model, self.first, self.last = model, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        stack = m.decoder
        h = stack._embed(m._embed(x), None) if self.first else x  # (B, T, D)
        T = h.shape[1]
        rel_bias = stack.position.rel_bias(T, T)
        for block in stack.blocks.values():
            h = block(h, stack.position, causal=stack.causal, mask=None, rel_bias=rel_bias)
        if not self.last:
            return h
        if stack.final_norm is not None:
            h = stack.final_norm(h, None)
        return m.logits(h)  # (B, T, V)


class Pipelined(nn.Module):
    """This rank's pipeline stage of a decoder `Transformer`, and the schedule that trains it.

    `module` is the pruned model (checkpoints and final weights read it); `forward` is the
    evaluation forward (every rank returns the logits); `forward_backward` is one training step's
    forward and backward over its micro-batches.
    """

    wraps_module = True  # `trainer.distributed.unwrap` returns `.module`

    def __init__(self, model: nn.Module, device: torch.device, n_micro: int, schedule: str):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.rank, self.stages = dist.get_rank(), dist.get_world_size()
        self.first, self.last = self.rank == 0, self.rank == self.stages - 1
        stack = model.decoder
        n = len(stack.blocks)
        lo, hi = self.rank * n // self.stages, (self.rank + 1) * n // self.stages
        stack.blocks = nn.ModuleDict({str(i): stack.blocks[i] for i in range(lo, hi)})
        tied = model.head is None
        if not self.first:
            stack.embed_norm = None
            model.embed_types = None
            if not (self.last and tied):
                model.embed = None
        if not self.last:
            stack.final_norm = None
            model.head = None
        self.module = model
        self.d_model, self.vocab = model.d_model, model.vocab_size
        # Held by several stages: the position module's parameters (every stage), a tied embedding
        # (the first and the last). Their gradients are summed over the stages that hold them.
        self.shared = list(stack.position.parameters())
        self.tied = [model.embed.weight] if tied and model.embed is not None and self.stages > 1 else []
        # every rank creates the group (a collective call), only the first and last stage use it
        self.tied_group = dist.new_group([0, self.stages - 1]) if tied and self.stages > 1 else None
        self.stage = _Stage(model, self.first, self.last)
        self._step_loss: dict = {}
        pipe_stage = PipelineStage(self.stage, self.rank, self.stages, device)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = cls(pipe_stage, n_micro, loss_fn=self._loss, scale_grads=False)
        self.device = device

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = self._step_loss
        ls, c = cross_entropy_sum(logits, target, s["z_loss"])
        # The schedule's first step also calls this once on placeholder outputs (to learn the
        # gradients' shapes) before the micro-batches: only the last n_micro calls are kept.
        s["sums"].append(torch.stack([ls.detach().float(), c.float()]))
        return s["scale"](ls * s["factor"])

    def forward_backward(self, micros: list[dict], objective, factor: float, scaler) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch (CLM rows `x`, targets `y`) through the
        pipeline; each micro-batch's summed loss is multiplied by `factor` and `scaler.scale`d
        before its backward. Returns (summed loss, argmax hits), the same on every rank."""
        self._step_loss = {"z_loss": objective.z_loss, "factor": factor, "scale": scaler.scale,
                           "sums": []}
        x = torch.cat([m["x"] for m in micros]).to(self.device)
        y = torch.cat([m["y"] for m in micros]).to(self.device)
        if self.first:
            self.schedule.step(x, target=y if self.last else None)
        elif self.last:
            self.schedule.step(target=y)
        else:
            self.schedule.step()
        self._sync_shared_grads()
        kept = self._step_loss["sums"][-len(micros):]
        sums = torch.stack(kept).sum(0) if kept else torch.zeros(2, device=self.device)
        dist.broadcast(sums, src=self.stages - 1)
        return sums[0], sums[1]

    def _sync_shared_grads(self) -> None:
        for params, group in ((self.shared, None), (self.tied, self.tied_group)):
            for p in params:
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)

    def grad_norm_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients this rank adds to the global norm (a shared parameter
        is counted on stage 0 only)."""
        shared = {id(p) for p in self.shared + self.tied}
        return [p for p in self.module.parameters() if self.first or id(p) not in shared]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluation: logits (B, T, V) of `tokens` (B, T) on every rank (stages run in order)."""
        B, T = tokens.shape
        if self.first:
            h = self.stage(tokens.to(self.device))
        else:
            h = torch.empty(B, T, self.d_model, device=self.device)
            dist.recv(h, src=self.rank - 1)
            h = self.stage(h)
        if not self.last:
            dist.send(h.float().contiguous(), dst=self.rank + 1)
            logits = torch.empty(B, T, self.vocab, device=self.device)
        else:
            logits = h.float().contiguous()
        dist.broadcast(logits, src=self.stages - 1)
        return logits


def apply_pipeline(model: nn.Module, device: torch.device, n_micro: int, schedule: str) -> Pipelined:
    """Split a decoder over every rank of the default group (one stage each); see `Pipelined`."""
    return Pipelined(model, device, n_micro, schedule)
