"""`finetune(config)` and `resume(run_dir)`: the CE-CLIP two-stage contrastive training loop.

Everything that can fail on bad input (data, checkpoint, batch size, run folder) is checked before the first
step; a run never overwrites another run. Checkpoints are cn_clip's format (`module.`-free), written
crash-safely; a non-finite loss or gradient stops the run naming the step, leaving the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..errors import EngineError, InputError
from ..install_hints import require
from ..models import LoadedModel, build_model, get_spec, load_model, load_weights
from . import checkpoint as ckpt
from . import distributed
from .config import LOGIT_SCALE_MAX, FinetuneConfig
from .data import BatchPlan, PixelSet, RankBatches, Split, batch_length, load_split, pixel_loader, tokenize_texts
from .gradcache import StepInputs, step_gradients
from .loss import average_gradients
from .plot import plot_curves
from .schedule import build_optimizer, lr_at
from .threads import default_threads, machine_cores, machine_load
from .validate import validate

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(EngineError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step and the last checkpoint."""


@dataclass(frozen=True)
class FinetuneResult:
    """Where the run stands when `finetune`/`resume` returns."""

    run_dir: Path
    step: int
    total_steps: int
    best_step: int | None
    best_mr: float | None
    last_validation: dict[str, Any] | None
    stopped_early: bool

    @property
    def latest(self) -> Path:
        return ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST_NAME

    @property
    def best(self) -> Path | None:
        path = ckpt.checkpoints_dir(self.run_dir) / ckpt.BEST_NAME
        return path if path.is_file() else None


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Start a new run in `config.out` (which must not hold one)."""
    return _Run(config, resume_state=None).train()


def resume(run_dir: str | Path, *, stop_after_steps: int | None = None, device: str | None = None,
           num_workers: int | None = None, threads: int | None = None, progress: bool | None = None
           ) -> FinetuneResult:
    """Continue a run from RUN_DIR/checkpoints/epoch_latest.pt exactly where it stopped (optimizer, schedule,
    data order and random state); only settings that do not change the result may be given anew."""
    run_dir = Path(run_dir)
    config = ckpt.read_config(run_dir)
    changes: dict[str, Any] = {"out": run_dir, "stop_after_steps": stop_after_steps, "progress": progress}
    if device is not None:
        changes["device"] = device
    if num_workers is not None:
        changes["num_workers"] = num_workers
    if threads is not None:
        changes["threads"] = threads
    return _Run(replace(config, **changes), resume_state=ckpt.load_training_checkpoint(run_dir)).train()


def resolve_precision(config: FinetuneConfig, device: torch.device) -> str:
    """"auto": bf16 on a GPU that has it (else fp16), fp32 on CPU. Low precision on CPU is refused."""
    if config.precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if config.precision != "fp32" and device.type != "cuda":
        raise InputError(f"precision {config.precision!r} is for CUDA; training on {device} runs in fp32")
    return config.precision


def set_stage(model: torch.nn.Module, stage: int) -> None:
    """Stage 1: the vision tower is frozen (no gradients, eval mode so BatchNorm statistics stay put)."""
    model.train()
    for param in model.visual.parameters():
        param.requires_grad_(stage == 2)
    if stage == 1:
        model.visual.eval()


def set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


class _Run:
    """One invocation: set-up checks, then the step loop with logging, validation and checkpoints."""

    def __init__(self, config: FinetuneConfig, resume_state: dict[str, Any] | None) -> None:
        self.config = config
        self.resume_state = resume_state
        self.run_dir = Path(config.out)

    # ---- set-up ------------------------------------------------------------------------------------------

    def train(self) -> FinetuneResult:
        # optional dependencies first: a missing one must stop the run before any file or step
        require(("matplotlib",), "finetune", "fine-tuning's training plot (RUN_DIR/curves.png)")
        self.ranks = distributed.setup(self.config.device)
        threads = torch.get_num_threads()
        try:
            self._prepare()
            return self._loop()
        finally:
            torch.set_num_threads(threads)  # the caller's setting again
            distributed.teardown(self.ranks)

    def _set_threads(self) -> None:
        """CPU torch threads: --threads, else $OMP_NUM_THREADS (torch already follows it), else the free cores."""
        config, ranks = self.config, self.ranks
        if ranks.device.type != "cpu" or (config.threads is None and os.environ.get("OMP_NUM_THREADS")):
            return
        cores, load = machine_cores(), machine_load()
        threads = config.threads or default_threads(cores, load, ranks.world_size)
        torch.set_num_threads(threads)
        if ranks.main and config.progress is not False:
            how = "--threads" if config.threads else f"{cores} cores, load {load:.1f}; --threads N to change"
            print(f"fine-tuning on the CPU with {threads} torch thread(s) per rank ({how})", file=sys.stderr)

    def _prepare(self) -> None:
        config, ranks = self.config, self.ranks
        self._set_threads()
        self.precision = resolve_precision(config, ranks.device)
        if config.batch_size % ranks.world_size:
            raise InputError(f"batch size {config.batch_size} is not divisible by the {ranks.world_size} ranks")
        if config.grad_cache_chunk is not None and config.grad_cache_chunk > config.batch_size // ranks.world_size:
            raise InputError(f"grad_cache_chunk {config.grad_cache_chunk} exceeds the per-rank batch "
                             f"{config.batch_size // ranks.world_size}")
        self.train_split = load_split(config.data, config.train_split, config.layout, config.skip_bad)
        self.valid_split: Split | None = None
        if config.valid_split is not None:
            self.valid_split = load_split(config.data, config.valid_split, config.layout, config.skip_bad)
        self.plan = BatchPlan(self.train_split.text_images, config.batch_size, config.seed)
        self.stage1, self.stage2 = config.stage_steps(self.plan.steps_per_epoch)
        self.total = self.stage1 + self.stage2
        if self.total == 0:
            raise InputError("both stages have 0 steps: nothing to train")
        self.tokens = tokenize_texts(self.train_split.texts, config.context_length)
        self.loaded = self._load_model()
        self._prepare_run_dir()
        model = self.loaded.model
        if config.dropout is not None:
            set_dropout(model, config.dropout)
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(ranks.device)
        self.optimizer = build_optimizer(model, config)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.params = list(model.parameters())
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.bad_validations = 0
        self.last_validation: dict[str, Any] | None = None
        self.step = 0
        self.saved_step: int | None = None
        if self.resume_state is None:
            torch.manual_seed(config.seed + ranks.rank)
        else:
            self._restore(self.resume_state)

    def _load_model(self) -> LoadedModel:
        config = self.config
        if self.resume_state is None:
            return load_model(config.checkpoint, config.model, config.random_weights)
        state = self.resume_state
        if state["finetune"].get("model") != config.model:
            raise InputError(f"--resume {self.run_dir}: its checkpoint holds {state['finetune'].get('model')!r}, "
                             f"the run's config says {config.model!r}")
        spec = get_spec(config.model)
        net = build_model(spec)
        load_weights(net, state["state_dict"], str(ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST_NAME))
        return LoadedModel(spec, net, "resumed")

    def _prepare_run_dir(self) -> None:
        """Rank 0 checks and creates the folder; every rank learns the outcome (so none waits forever)."""
        problem = None
        if self.ranks.main:
            try:
                if self.resume_state is None:
                    ckpt.prepare_new_run(self.run_dir)
                    ckpt.write_config(self.run_dir, self.config)
                else:
                    ckpt.check_writable(self.run_dir)
            except InputError as exc:
                problem = str(exc)
        problem = distributed.from_main(self.ranks, problem)
        if problem is not None:
            raise InputError(problem)

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        info = state["finetune"]
        if self.scaler is not None and info.get("scaler"):
            self.scaler.load_state_dict(info["scaler"])
        self.step = self.saved_step = int(state["step"])
        self.best = info.get("best")
        self.bad_validations = int(info.get("bad_validations", 0))
        self.last_validation = info.get("last_validation")
        states = info["rng"]
        if len(states) == self.ranks.world_size:
            mine = states[self.ranks.rank]
            torch.set_rng_state(mine["cpu"])
            if mine.get("cuda") is not None and self.ranks.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.ranks.device)
        else:  # another number of ranks: the data order is still exact, dropout draws are re-seeded
            torch.manual_seed(self.config.seed + self.ranks.rank + 7919 * self.step)
        if self.ranks.main:
            self.rows = ckpt.truncate_log(self.run_dir, self.step)

    # ---- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> FinetuneResult:
        config, ranks = self.config, self.ranks
        end = self.total if config.stop_after_steps is None else min(self.total, config.stop_after_steps)
        stopped_early = False
        if self.resume_state is None and self.valid_split is not None:
            stopped_early = self._validate_and_save()  # step 0: the starting (zero-shot) figures
        pixels = PixelSet(self.train_split.images, self.loaded.spec.input_resolution)
        sampler = RankBatches(self.plan, self.step, end, ranks.rank, ranks.world_size)
        loader = pixel_loader(pixels, sampler, config.num_workers, ranks.device.type == "cuda")
        hidden = True if not ranks.main else (None if config.progress is None else not config.progress)
        bar = tqdm(total=end, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True, disable=hidden)
        autocast = self._autocast()
        with bar, _quiet_checkpointing(config.grad_checkpointing):
            started = time.perf_counter()  # pairs/s counts loading and the step, not validation or saving
            for batch in loader:
                if stopped_early:
                    break
                row = self._train_step(batch, autocast)
                row["pairs_per_s"] = config.batch_size / (time.perf_counter() - started)
                self._log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                pairs_s=f"{row['pairs_per_s']:.1f}", refresh=False)
                if self._validation_due():
                    stopped_early = self._validate_and_save()
                elif (config.save_every and self.step % config.save_every == 0) or self.step == end:
                    self._save()
                started = time.perf_counter()
        if self.ranks.main:
            plot_curves(self.rows, self.run_dir / ckpt.PLOT_NAME)
        best = self.best or {}
        return FinetuneResult(self.run_dir, self.step, self.total, best.get("step"), best.get("mr"),
                              self.last_validation, stopped_early)

    def _train_step(self, pixels: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager]
                    ) -> dict[str, Any]:
        config, ranks, model = self.config, self.ranks, self.loaded.model
        stage = 1 if self.step < self.stage1 else 2
        set_stage(model, stage)
        lr = lr_at(self.step, self.stage1, self.stage2, config.lr, config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        texts, images = self.plan.global_batch(self.step)
        local = config.batch_size // ranks.world_size
        mine = texts[ranks.rank * local:(ranks.rank + 1) * local]
        ids = self.tokens[mine][:, :batch_length(self.tokens[texts])]
        inputs = StepInputs(pixels.to(ranks.device, non_blocking=True), ids.to(ranks.device),
                            self.plan.positives(texts, images).to(ranks.device))
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler is not None else (lambda loss: loss)
        loss = step_gradients(model, inputs, train_vision=stage == 2, chunk=config.grad_cache_chunk,
                              autocast=autocast, scale=scale)
        value = float(loss)
        if not math.isfinite(value):
            self._fail(f"the loss is {value} at step {self.step + 1} (stage {stage})")
        average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.params if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf")))
        if not math.isfinite(norm) and self.scaler is None:
            self._fail(f"the gradient norm is {norm} at step {self.step + 1} (stage {stage})")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        self.step += 1
        return {"step": self.step, "stage": stage, "epoch": self.plan.epoch_of(self.step - 1), "loss": value,
                "lr": lr, "logit_scale": float(model.logit_scale.detach().exp()), "grad_norm": norm}

    def _fail(self, what: str) -> None:
        latest = ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST_NAME
        if self.saved_step is not None:
            kept = f"the last good checkpoint, {latest} (step {self.saved_step}), is kept"
        else:
            kept = "no checkpoint had been saved yet"
        message = f"{what}; training stopped: {kept}. Lower --lr or set --grad-clip, then --resume or restart."
        if self.ranks.main:
            self._log({"step": self.step + 1, "error": message})
            plot_curves(self.rows, self.run_dir / ckpt.PLOT_NAME)
        raise TrainingError(message)

    def _validation_due(self) -> bool:
        if self.valid_split is None:
            return False
        every = self.config.valid_every
        return (bool(every) and self.step % every == 0) or self.step in (self.stage1, self.total)

    def _validate_and_save(self) -> bool:
        """Validate on rank 0, save epoch_latest (and best when MR improved); True when early stopping says stop."""
        stop = False
        if self.ranks.main:
            metrics = validate(self.loaded.model, self.config.model, self.loaded.spec.input_resolution,
                               self.valid_split.dataset, laclip=self.config.laclip,
                               context_length=self.config.context_length, batch_size=self.config.valid_batch_size,
                               device=str(self.ranks.device))
            mr = metrics["global"]["MR"]
            improved = self.best is None or mr > self.best["mr"]
            if improved:
                self.best = {"step": self.step, "mr": mr}
                self.bad_validations = 0
            else:
                self.bad_validations += 1
            self.last_validation = metrics
            self._log({"step": self.step, "valid": metrics, "best": improved})
            self._save(best=improved)
            plot_curves(self.rows, self.run_dir / ckpt.PLOT_NAME)
            stop = self.config.early_stop is not None and self.bad_validations >= self.config.early_stop
        else:
            self._save()
        return bool(distributed.from_main(self.ranks, stop))

    # ---- output ------------------------------------------------------------------------------------------

    def _save(self, best: bool = False) -> None:
        """Write epoch_latest.pt (rank 0; every rank contributes its random state), and best.pt when `best`."""
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.ranks.device) if self.ranks.device.type == "cuda" else None}
        states = distributed.gather_objects(self.ranks, rng)
        if not self.ranks.main:
            return
        model = self.loaded.model
        payload = {
            "epoch": self.plan.epoch_of(max(self.step - 1, 0)) + 1,
            "step": self.step,
            "name": self.run_dir.name,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "finetune": {
                "model": self.config.model, "config": self.config.to_dict(), "total_steps": self.total,
                "stage": 1 if self.step < self.stage1 else 2, "best": self.best,
                "bad_validations": self.bad_validations, "last_validation": self.last_validation,
                "rng": states, "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world_size": self.ranks.world_size,
            },
        }
        ckpt.save_training_checkpoint(ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST_NAME, payload)
        self.saved_step = self.step
        if best:
            ckpt.copy_as_best(self.run_dir)

    def _log(self, row: dict[str, Any]) -> None:
        if not self.ranks.main:
            return
        self.rows.append(row)
        with open(self.run_dir / ckpt.LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        if self.precision == "fp32":
            return contextlib.nullcontext
        dtype = _AUTOCAST_DTYPES[self.precision]
        return lambda: torch.autocast(self.ranks.device.type, dtype=dtype)


@contextlib.contextmanager
def _quiet_checkpointing(enabled: bool):
    """cn_clip calls torch.utils.checkpoint without use_reentrant, which warns on every layer call (and, in the
    gradient-caching pass that runs without a graph, that no input needs a gradient)."""
    with warnings.catch_warnings():
        if enabled:
            warnings.filterwarnings("ignore", message="torch.utils.checkpoint: the use_reentrant")
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")  # no-grad pass
        yield
