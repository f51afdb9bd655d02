"""The optimizer and its learning-rate schedule, built from their config sections and handed
to DeepSpeed as objects (so DeepSpeed steps and checkpoints them)."""

from __future__ import annotations

import torch

from rnnscale.train.config import OptimSection, ScheduleSection
from rnnscale.train.schedule import lr_multiplier


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only: no decay on norms, biases, embeddings,
    or parameters a mixer marks `_no_weight_decay` (decay rates, step sizes)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions keep the whole shape
        skip = ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, optim.weight_decay), (no_decay, 0.0))
        if params  # DeepSpeed drops empty groups; the LR schedule must see the same ones
    ]
    return SkippableAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                          fused=True)  # fmt: skip


def build_scheduler(optimizer, schedule: ScheduleSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, max_steps))


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW that can be told to leave out its next step. Under ZeRO 1-3 DeepSpeed skips
    a step with non-finite gradients itself; plain data parallel (ZeRO 0) steps the optimizer
    directly, so the trainer checks the gradient norm and calls `skip_next_step()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = False

    def skip_next_step(self) -> None:
        self._skip = True

    @torch.no_grad()
    def step(self, closure=None):
        if self._skip:
            self._skip = False
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return None
        return super().step(closure)
