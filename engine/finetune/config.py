"""`FinetuneConfig`: every setting of a fine-tuning run, checked once, stored in RUN_DIR/config.json.

Defaults follow the CE-CLIP paper's Table 2 where it gives a value (context length 52, warm-up 100 steps,
batch 128, learning rate 5e-5, weight decay 0.001); the stage lengths and AdamW betas/eps are cn_clip's
ViT defaults or ours, documented in the README.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..laclip import LaclipConfig
from ..models import available_models

Precision = Literal["auto", "fp32", "bf16", "fp16"]
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learnable temperature at 100


@dataclass(frozen=True)
class FinetuneConfig:
    """One run. Stage 1 trains the text tower with the vision tower frozen; stage 2 trains both.

    A stage's length is `stageN_steps`, or `stageN_epochs` whole passes over the training texts when given
    (each text is one anchor per epoch, paired with one of its images drawn at random).
    """

    model: str
    data: Path
    out: Path
    checkpoint: Path | None = None
    random_weights: bool = False
    train_split: str = "train"
    valid_split: str | None = "valid"
    layout: Literal["auto", "tsv", "folder"] = "auto"
    skip_bad: bool = False
    stage1_steps: int = 500
    stage2_steps: int = 500
    stage1_epochs: int | None = None
    stage2_epochs: int | None = None
    batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.001
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = None
    context_length: int = 52
    dropout: float | None = None  # None keeps the model's own (BERT 0.1); 0 disables dropout
    grad_cache_chunk: int | None = None  # pairs per chunk; None = plain back-propagation of the whole batch
    grad_checkpointing: bool = False
    precision: Precision = "auto"
    device: str = "cpu"
    num_workers: int = 0
    threads: int | None = None  # CPU torch threads; None: $OMP_NUM_THREADS if set, else threads.default_threads
    seed: int = 0
    valid_every: int = 200
    valid_batch_size: int = 64
    laclip: LaclipConfig | None = None  # also report LACLIP metrics at validation (best is still by global MR)
    early_stop: int | None = None  # stop after this many validations without a better MR
    save_every: int | None = None  # also write epoch_latest.pt every N steps (it is always written at validation)
    stop_after_steps: int | None = None  # end this invocation at this global step (resume later)
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.model not in available_models():
            raise InputError(f"unknown model {self.model!r}; available models: {available_models()}")
        for name in ("stage1_steps", "stage2_steps", "warmup_steps", "num_workers", "valid_every"):
            _check_int(name, getattr(self, name), 0)
        for name in ("batch_size", "valid_batch_size", "context_length"):
            _check_int(name, getattr(self, name), 1)
        for name in ("stage1_epochs", "stage2_epochs", "stop_after_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        for name in ("grad_cache_chunk", "early_stop", "save_every", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.context_length < 3:
            raise InputError(f"context_length must be at least 3, got {self.context_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not all(0 <= b < 1 for b in self.betas) or not self.eps > 0:
            raise InputError(f"betas must be in [0, 1) and eps > 0, got {self.betas!r}, {self.eps!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.random_weights and self.checkpoint is not None:
            raise InputError(f"random_weights excludes a checkpoint (got {self.checkpoint})")
        if self.layout not in ("auto", "tsv", "folder"):
            raise InputError(f"layout must be 'auto', 'tsv' or 'folder', got {self.layout!r}")

    def stage_steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(stage 1 steps, stage 2 steps): epochs, when given, converted with the split's steps per epoch."""
        one = self.stage1_steps if self.stage1_epochs is None else self.stage1_epochs * steps_per_epoch
        two = self.stage2_steps if self.stage2_epochs is None else self.stage2_epochs * steps_per_epoch
        return one, two

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as str, LACLIP settings as a dict."""
        out = asdict(self)
        for key in ("data", "out", "checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        out["laclip"] = None if self.laclip is None else self.laclip.to_dict()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown fine-tuning settings {unknown}")
        values = dict(data)
        for key in ("data", "out", "checkpoint"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if values.get("laclip") is not None:
            values["laclip"] = LaclipConfig.from_dict(values["laclip"])
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
