"""AdamW parameter groups (no weight decay on norms, biases, the logit scale) and the per-stage learning rate."""
from __future__ import annotations

import math

import torch

from .config import FinetuneConfig


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """cn_clip's rule: 1-D tensors (norm weights, biases, the logit scale) and BatchNorm/LayerNorm get no decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones simply receive no gradient, so AdamW leaves them untouched)."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if not no_decay(n, p)]
    plain = [p for n, p in named if no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lr_at(step: int, stage1_steps: int, stage2_steps: int, base_lr: float, warmup: int) -> float:
    """Learning rate of 0-based global `step`: each stage warms up linearly over its first `warmup` steps
    (capped at its length), then decays to 0 on a half cosine over the rest."""
    local, length = (step, stage1_steps) if step < stage1_steps else (step - stage1_steps, stage2_steps)
    warm = min(warmup, length)
    if local < warm:
        return base_lr * (local + 1) / warm
    span = max(1, length - warm)
    return 0.5 * base_lr * (1 + math.cos(math.pi * (local - warm) / span))
