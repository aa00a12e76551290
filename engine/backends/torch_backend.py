"""PyTorch towers: cn_clip's own forward in fp32 (the reference), the restated SDPA towers under fp16/bf16 autocast.

bf16 also runs on CPU (oneDNN's bf16 GEMMs, fast where the CPU has AMX or AVX512-BF16: engine.backends.cpu_features);
fp16 is for CUDA only.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch

from ..errors import InputError
from ..towers import TextTower, VisionTower
from .base import l2_normalize, trim_padding

Precision = Literal["fp32", "fp16", "bf16"]
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEncoder:
    """Wraps a cn_clip CLIP module. fp32 runs cn_clip's own forward; fp16 (CUDA) and bf16 (CUDA or CPU) run
    engine.towers under autocast, whose scaled_dot_product_attention reaches the fused attention kernels."""

    def __init__(self, model: torch.nn.Module, input_resolution: int, device: str = "cpu",
                 precision: Precision = "fp32", pad_id: int = 0) -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise InputError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but no CUDA GPU is available")
        if precision == "fp16" and self.device.type != "cuda":
            raise InputError(f"precision 'fp16' is for CUDA; on {device!r} use fp32 or bf16")
        self.model = model.to(self.device).float().eval()
        self.precision = precision
        low_precision = precision != "fp32"
        self._image_tower = VisionTower(self.model).eval() if low_precision else self.model.encode_image
        self._text_tower = TextTower(self.model, pad_id).eval() if low_precision else self._reference_text
        self.input_resolution = input_resolution
        self.embed_dim = int(model.text_projection.shape[1])
        self.pad_id = pad_id

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    def _reference_text(self, ids: torch.Tensor) -> torch.Tensor:
        """cn_clip's encode_text with this encoder's pad id."""
        hidden = self.model.bert(ids, attention_mask=ids.ne(self.pad_id).float())[0]
        return hidden[:, 0, :] @ self.model.text_projection

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        with self._autocast():
            out = self._image_tower(pixels.to(self.device, non_blocking=True))
        return l2_normalize(out.float().cpu().numpy())

    @torch.inference_mode()
    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        trimmed = trim_padding(token_ids.cpu().numpy(), self.pad_id, min_length=1)
        ids = torch.from_numpy(trimmed).to(self.device, non_blocking=True)
        with self._autocast():
            out = self._text_tower(ids)
        return l2_normalize(out.float().cpu().numpy())
