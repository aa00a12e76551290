"""One training step's gradients: plain back-propagation, or gradient caching for batches that do not fit.

Gradient caching (Gao et al., GradCache): embed the batch in chunks without a graph, compute the loss over the
whole (gathered) batch on detached copies, back-propagate it to the embeddings only, then re-run each chunk
with a graph and push the cached embedding gradients through it. Each chunk's random state (dropout) is
recorded on the first pass and replayed on the second, so the gradients are those of one full-batch pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .loss import contrastive_loss, gather_with_grad


@dataclass
class StepInputs:
    """This rank's rows of the global batch, and which global pairs match (for false-negative masking)."""

    pixels: torch.Tensor  # [b, 3, R, R]
    token_ids: torch.Tensor  # [b, L]
    positives: torch.Tensor  # [B, B] bool, B = b * world_size


class _RngState:
    """The CPU (and current CUDA device's) generator state, to replay a chunk's dropout masks exactly."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _encode_images(model: torch.nn.Module, pixels: torch.Tensor, train_vision: bool) -> torch.Tensor:
    grad = contextlib.nullcontext() if train_vision else torch.no_grad()
    with grad:
        return model.encode_image(pixels)


def step_gradients(model: torch.nn.Module, inputs: StepInputs, *, train_vision: bool, chunk: int | None,
                   autocast: Callable[[], contextlib.AbstractContextManager],
                   scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> torch.Tensor:
    """Accumulate d(loss)/d(parameters) into `.grad` for one global batch; returns the loss (detached).

    `chunk` None back-propagates the whole local batch at once; otherwise gradient caching with `chunk` rows
    per re-forward. `scale` multiplies the loss before backward (fp16 loss scaling).
    """
    if chunk is None or chunk >= len(inputs.pixels):
        with autocast():
            image = _encode_images(model, inputs.pixels, train_vision)
            text = model.encode_text(inputs.token_ids)
        loss = contrastive_loss(gather_with_grad(image), gather_with_grad(text), model.logit_scale,
                                inputs.positives)
        scale(loss).backward()
        return loss.detach()
    return _cached_step(model, inputs, train_vision, chunk, autocast, scale)


def _cached_step(model: torch.nn.Module, inputs: StepInputs, train_vision: bool, chunk: int,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    device = inputs.pixels.device
    spans = [slice(i, i + chunk) for i in range(0, len(inputs.pixels), chunk)]
    states: list[tuple[_RngState, _RngState]] = []
    images, texts = [], []
    with torch.no_grad():
        for span in spans:
            image_state = _RngState(device)
            with autocast():
                images.append(model.encode_image(inputs.pixels[span]))
            text_state = _RngState(device)
            with autocast():
                texts.append(model.encode_text(inputs.token_ids[span]))
            states.append((image_state, text_state))
    image = torch.cat(images).requires_grad_(train_vision)
    text = torch.cat(texts).requires_grad_(True)
    loss = contrastive_loss(gather_with_grad(image), gather_with_grad(text), model.logit_scale, inputs.positives)
    scale(loss).backward()
    resume_state = _RngState(device)
    for span, (image_state, text_state) in zip(spans, states):
        outputs, grads = [], []
        if train_vision:
            image_state.restore()
            with autocast():
                outputs.append(model.encode_image(inputs.pixels[span]))
            grads.append(image.grad[span])
        text_state.restore()
        with autocast():
            outputs.append(model.encode_text(inputs.token_ids[span]))
        grads.append(text.grad[span])
        torch.autograd.backward(outputs, grads)
    resume_state.restore()
    return loss.detach()
