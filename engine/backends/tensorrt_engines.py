"""Build TensorRT 10 engines from an export's ONNX files when it is opened, keyed on TensorRT version and GPU
(rebuilt on change): engines are per machine, so the runtime builds them, not the export.

An engine directory (`<export>/tensorrt/`) holds vision.engine, text.engine, timing.cache and config.json.
fp16 engines are built strongly typed from the fp16 ONNX files, so LayerNorm stays in fp32 as exported.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import CheckpointError, EngineError, InputError

from .export_manifest import ExportManifest

ENGINE_DIR = "tensorrt"
CONFIG_NAME = "config.json"
ENGINE_FILES = {"vision": "vision.engine", "text": "text.engine"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileConfig:
    """Optimisation-profile ranges (min/opt/max) for batch and text length, and the builder's workspace."""

    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    min_sequence: int = 2
    opt_sequence: int = 24
    max_sequence: int = 52
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self}")
        if not 2 <= self.min_sequence <= self.opt_sequence <= self.max_sequence:
            raise InputError(f"need 2 <= min_sequence <= opt_sequence <= max_sequence, got {self}")


@dataclass(frozen=True)
class BuildEnvironment:
    """What an engine is only valid for."""

    tensorrt_version: str
    gpu_name: str


def current_environment() -> BuildEnvironment:
    """TensorRT version and current GPU name; an InputError when either is absent."""
    import torch

    from .tensorrt_backend import import_tensorrt

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise InputError("building TensorRT engines needs a CUDA GPU; none is available")
    return BuildEnvironment(trt.__version__, torch.cuda.get_device_name())


def rebuild_reason(engine_dir: Path, env: BuildEnvironment, manifest: ExportManifest,
                   profile: ProfileConfig) -> str | None:
    """Why the engines in `engine_dir` cannot be used as they are, or None when they can."""
    config_path = engine_dir / CONFIG_NAME
    if not config_path.is_file():
        return f"no {CONFIG_NAME} in {engine_dir}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{config_path} is unreadable ({exc.__class__.__name__})"
    expected = {"tensorrt_version": env.tensorrt_version, "gpu_name": env.gpu_name,
                "precision": manifest.precision, "checkpoint_hash": manifest.checkpoint_hash,
                "profile": asdict(profile)}
    for key, value in expected.items():
        if config.get(key) != value:
            return f"engines were built with {key}={config.get(key)!r}, now {value!r}"
    missing = [name for name in ENGINE_FILES.values() if not (engine_dir / name).is_file()]
    return f"missing engine files {missing}" if missing else None


def _shapes(manifest: ExportManifest, profile: ProfileConfig) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    r = manifest.input_resolution
    batches = (profile.min_batch, profile.opt_batch, profile.max_batch)
    seqs = (profile.min_sequence, profile.opt_sequence, profile.max_sequence)
    return {"vision": {manifest.vision.input_name: tuple((b, 3, r, r) for b in batches)},
            "text": {manifest.text.input_name: tuple(zip(batches, seqs))}}


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 precision: str, timing_cache: Path, workspace_gib: float) -> None:
    """Parse `onnx_path`, build with one min/opt/max profile and a persistent timing cache, write the plan."""
    from .tensorrt_backend import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = precision == "fp16"  # the fp16 ONNX carries its own types (LayerNorm in fp32)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not typed:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 engines must match fp32 PyTorch
    opt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        opt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def ensure_engines(export_dir: str | Path, manifest: ExportManifest, profile: ProfileConfig | None = None) -> Path:
    """The engine directory of `export_dir`, (re)built first when `rebuild_reason` gives a reason."""
    profile = profile or ProfileConfig()
    if manifest.precision not in ("fp32", "fp16"):
        raise InputError(f"TensorRT engines are built from fp32 or fp16 exports, not {manifest.precision!r} "
                         f"(int8 exports are for ONNX Runtime on CPU)")
    if profile.max_sequence > manifest.context_length:
        profile = ProfileConfig(**{**asdict(profile), "max_sequence": manifest.context_length,
                                   "opt_sequence": min(profile.opt_sequence, manifest.context_length)})
    export_dir = Path(export_dir)
    engine_dir = export_dir / ENGINE_DIR
    env = current_environment()
    reason = rebuild_reason(engine_dir, env, manifest, profile)
    if reason is None:
        return engine_dir
    log.warning("building TensorRT engines in %s: %s", engine_dir, reason)
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / CONFIG_NAME).unlink(missing_ok=True)  # a half-built directory is never taken as valid
    shapes = _shapes(manifest, profile)
    for tower, entry in (("vision", manifest.vision), ("text", manifest.text)):
        build_engine(export_dir / entry.file, engine_dir / ENGINE_FILES[tower], shapes[tower], manifest.precision,
                     engine_dir / "timing.cache", profile.workspace_gib)
    config = {**asdict(env), "precision": manifest.precision, "checkpoint_hash": manifest.checkpoint_hash,
              "profile": asdict(profile), "engines": ENGINE_FILES}
    (engine_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return engine_dir
