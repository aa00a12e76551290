"""PyTorch towers: cn_clip's own forward in fp32 (the reference), the restated SDPA towers under fp16/bf16 autocast,
or in bf16 with the vision tower compiled.

bf16 also runs on CPU (oneDNN's bf16 GEMMs, fast where the CPU has AMX or AVX512-BF16: engine.backends.cpu_features);
fp16 is for CUDA only. "bf16-compiled" stores both towers' weights in bf16 (LayerNorms stay fp32, so their statistics
are fp32) and compiles the vision tower with TorchInductor and weight freezing, one static graph per batch bucket
(1, 2, 4, 8, then multiples of 8: batches are zero-padded up to their bucket), so a process compiles a bounded
number of graphs; the text tower, whose shapes vary with query length, runs eagerly. Measured on a 2-core Xeon
with AMX (ViT-B-16, batch 8): autocast 3.7x, compiled 5.5x the fp32 reference; for text, bf16 weights beat autocast.
"int8-text" (CPU) keeps cn_clip's fp32 image tower and runs the text tower with int8 weights in the extension's
native encoder (engine.int8_text), the fastest path for short queries.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Literal

import numpy as np
import torch

from ..errors import InputError
from ..towers import TextTower, VisionTower
from .base import l2_normalize, trim_padding

Precision = Literal["fp32", "fp16", "bf16", "bf16-compiled", "int8-text"]
PRECISIONS = ("fp32", "fp16", "bf16", "bf16-compiled", "int8-text")
# what the CLIs accept: "auto" times this CPU's precisions per tower (engine.backends.auto_precision)
PRECISION_CHOICES = (*PRECISIONS, "auto")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def batch_bucket(n: int) -> int:
    """The padded batch size a compiled graph runs at: the next power of two up to 8, then the next multiple of 8."""
    if n < 1:
        raise InputError(f"batch size must be >= 1, got {n}")
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def low_precision_weights(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A copy of `module` with `dtype` parameters except its LayerNorms' (cn_clip's LayerNorm computes in fp32):
    cast once, so autocast has no fp32 master weights to re-cast on every call."""
    out = copy.deepcopy(module).to(dtype)
    for sub in out.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.float()
    return out


def _inductor(module: torch.nn.Module) -> Callable:
    return torch.compile(module, dynamic=False, options={"freezing": True})


class CompiledBuckets:
    """A module compiled by TorchInductor (weights frozen as constants) with static shapes, called at the batch
    bucket of each input: rows are zero-padded to it and cut off again. Each bucket has its own compiled function
    (so Dynamo's per-function recompile limit never sends a bucket back to eager), and batches above `max_bucket`
    run in slices of it, which bounds the graphs a process compiles."""

    def __init__(self, module: torch.nn.Module, max_bucket: int = 64,
                 compile: Callable[[torch.nn.Module], Callable] = _inductor) -> None:
        if max_bucket < 1 or batch_bucket(max_bucket) != max_bucket:
            raise InputError(f"max_bucket must be a batch bucket (1, 2, 4, 8, then multiples of 8), got {max_bucket}")
        self._module = module
        self._compile = compile
        self.max_bucket = max_bucket
        self.compiled: dict[int, Callable] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_bucket:
            return torch.cat([self(x[i:i + self.max_bucket]) for i in range(0, x.shape[0], self.max_bucket)])
        n = x.shape[0]
        padded = batch_bucket(n)
        if padded != n:
            x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
        if padded not in self.compiled:
            self.compiled[padded] = self._compile(self._module)
        return self.compiled[padded](x)[:n]


class TorchEncoder:
    """Wraps a cn_clip CLIP module. fp32 runs cn_clip's own forward; fp16 (CUDA) and bf16 (CUDA or CPU) run
    engine.towers under autocast, whose scaled_dot_product_attention reaches the fused attention kernels."""

    def __init__(self, model: torch.nn.Module, input_resolution: int, device: str = "cpu",
                 precision: Precision = "fp32", pad_id: int = 0) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but no CUDA GPU is available")
        if precision == "int8-text" and self.device.type != "cpu":
            raise InputError(f"precision 'int8-text' runs on the CPU, got device {device!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise InputError(f"precision 'fp16' is for CUDA; on {device!r} use fp32 or bf16")
        self.model = model.to(self.device).float().eval()
        self.precision = precision
        if precision == "fp32":
            self._image_tower, self._text_tower = self.model.encode_image, self._reference_text
        elif precision == "int8-text":  # short queries: int8 weights in the extension's native encoder
            from ..int8_text import Int8TextTower

            self._image_tower, self._text_tower = self.model.encode_image, Int8TextTower(self.model, pad_id)
        elif precision == "bf16-compiled":
            self._image_tower = CompiledBuckets(low_precision_weights(VisionTower(self.model).eval()))
            self._text_tower = low_precision_weights(TextTower(self.model, pad_id).eval())
        elif self.device.type == "cuda":  # fp16/bf16 on a GPU: weights cast once, autocast for the fp32 islands
            dtype = _AUTOCAST[precision]
            self._image_tower = low_precision_weights(VisionTower(self.model).eval(), dtype)
            self._text_tower = low_precision_weights(TextTower(self.model, pad_id).eval(), dtype)
        else:
            self._image_tower, self._text_tower = VisionTower(self.model).eval(), TextTower(self.model, pad_id).eval()
        self.input_resolution = input_resolution
        self.embed_dim = int(model.text_projection.shape[1])
        self.pad_id = pad_id

    def _autocast(self, tower: str = "image") -> contextlib.AbstractContextManager:
        """fp16/bf16 run under autocast. bf16-compiled's eager text tower too on CUDA, whose LayerNorm refuses bf16
        activations with fp32 weights (the CPU's accepts them, so the CPU path stays as measured)."""
        if self.precision in _AUTOCAST:
            return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])
        if self.precision == "bf16-compiled" and tower == "text" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(torch.bfloat16) if self.precision == "bf16-compiled" and x.is_floating_point() else x

    def _reference_text(self, ids: torch.Tensor) -> torch.Tensor:
        """cn_clip's encode_text with this encoder's pad id."""
        hidden = self.model.bert(ids, attention_mask=ids.ne(self.pad_id).float())[0]
        return hidden[:, 0, :] @ self.model.text_projection

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        with self._autocast():
            out = self._image_tower(self._inputs(pixels))
        return l2_normalize(out.float().cpu().numpy())

    @torch.inference_mode()
    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        trimmed = trim_padding(token_ids.cpu().numpy(), self.pad_id, min_length=1)
        with self._autocast("text"):
            out = self._text_tower(self._inputs(torch.from_numpy(trimmed)))
        return l2_normalize(out.float().cpu().numpy())
