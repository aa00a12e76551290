"""Symmetric InfoNCE over a global batch, with true pairs other than the diagonal masked out of the denominators,
and an all-gather that carries gradients back to the rank that produced each embedding."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        out = torch.empty((world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(out, local.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            mine = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order (the tensor itself when not distributed).

    Every rank computes the same global loss, so the gradient reaching rank r's rows is world_size times
    dL/d(rows); averaging parameter gradients over ranks (`average_gradients`) then gives exactly dL/dtheta.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of text->image and image->text cross-entropy over raw [B, D] embeddings (normalised here, in fp32).

    Pair i is (text i, image i). `positives` [B, B] (text i matches image j) marks off-diagonal true pairs,
    which are removed from both softmax denominators instead of being pushed apart as negatives.
    `logit_scale` is the log temperature (CLIP's parameter); its exp multiplies the cosines.
    """
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().exp() * text @ image.T  # [texts, images]
    if positives is not None:
        off_diagonal = positives.to(logits.device) & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def average_gradients(parameters: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """All-reduce the mean of each gradient across ranks, in flat buckets (no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    grads = [p.grad for p in parameters if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, grad in enumerate(grads):
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        last = i == len(grads) - 1
        if size >= bucket_bytes or last or grads[i + 1].dtype != grad.dtype:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0
