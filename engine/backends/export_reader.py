"""Open a `python -m export` directory as an Encoder: the runtime side of an export (export/ writes, this reads).

`open_encoder` is what `Retriever.from_export` and the server use. For an export made with `--precision auto`
(several precisions side by side), `choose_precision` names the one precision that was fastest over both towers
(among those whose hardware this CPU has), and `choose_towers` what auto chose for each tower on its own (ONNX,
torch or OpenVINO). `open_encoder(precision=None)` serves the per-tower choice: each tower from its chosen ONNX
precision, from the torch precision auto chose when the export's checkpoint is at hand (the same file, by hash),
or from OpenVINO over the ONNX files it was timed on when openvino is installed; else from that tower's best ONNX
precision.
"""
from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, InputError

from .base import Encoder
from .cpu_features import cpu_info
from .export_manifest import ExportManifest, load_manifest

BACKENDS = ("onnxruntime", "tensorrt")
# Precisions that are only worth serving where the CPU has the matching dot-product units.
NEEDS_CPU = {"bf16": ("bf16", "bf16 dot products (AMX or AVX512-BF16)"),
             "bf16-compiled": ("bf16", "bf16 dot products (AMX or AVX512-BF16)")}
log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "ExportManifest", "choose_precision", "choose_towers", "load_manifest", "open_encoder",
           "runnable_here"]


def _settings(cls: type, options: dict[str, Any], backend: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown {backend} options {unknown}; accepted: {sorted(names)}")
    return cls(**options)


def runnable_here(precision: str) -> str | None:
    """Why `precision` should not be served on this CPU, or None when it should."""
    need = NEEDS_CPU.get(precision)
    if need is None or getattr(cpu_info(), need[0]):
        return None
    return f"this CPU ({cpu_info().model}) has no {need[1]}"


def choose_precision(directory: str | Path) -> str:
    """The precision to serve from `directory`: its only one, or for an auto export the fastest candidate that
    passed parity and suits this CPU (measured at export time; a warning says when that was another CPU)."""
    manifest = load_manifest(directory)
    candidates = manifest.selection.get("candidates", {})
    if not candidates:
        return manifest.precision
    measured_on = manifest.selection.get("machine", {}).get("model")
    if measured_on and measured_on != cpu_info().model:
        log.warning("export %s was timed on %s, this is %s: serving its fastest precision there", directory,
                    measured_on, cpu_info().model)
    usable = {name: c for name, c in candidates.items() if c.get("passed") and runnable_here(name) is None}
    if not usable:
        raise CheckpointError(f"export {directory} holds no precision that passed parity and runs well on this CPU "
                              f"({cpu_info().model}): candidates {sorted(candidates)}")
    return min(usable, key=lambda name: usable[name]["seconds"])


def choose_towers(directory: str | Path) -> dict[str, dict[str, str]]:
    """Per tower, what an auto export chose: {"vision": {"chosen": "onnx-int8", "onnx": "int8"}, ...}, where
    "onnx" is that tower's best ONNX precision (served when the choice is a torch precision and the checkpoint is
    not at hand, or cannot run here) and, for an OpenVINO choice, "source" the export precision whose ONNX files it
    compiles. Empty for an export without per-tower timings."""
    manifest = load_manifest(directory)
    out: dict[str, dict[str, str]] = {}
    measured_on = manifest.selection.get("machine", {}).get("model")
    if manifest.selection.get("towers") and measured_on and measured_on != cpu_info().model:
        log.warning("export %s was timed on %s, this is %s: serving the per-tower choice made there", directory,
                    measured_on, cpu_info().model)
    for tower, entry in manifest.selection.get("towers", {}).items():
        onnx = entry.get("chosen_onnxruntime")
        if onnx is None:
            continue
        chosen = entry["chosen"]
        why_not = _why_not_here(chosen, entry["candidates"][chosen])
        if why_not is not None:
            log.warning("export %s: the %s tower's choice %s does not run here (%s); serving %s", directory,
                        tower, chosen, why_not, onnx)
            chosen = onnx
        out[tower] = {"chosen": chosen, "onnx": entry["candidates"][onnx]["precision"],
                      **({"source": entry["candidates"][chosen]["source"]} if chosen.startswith("openvino-") else {})}
    return out


def _why_not_here(name: str, candidate: dict[str, Any]) -> str | None:
    """Why the per-tower choice `name` cannot be served on this machine (None: it can)."""
    if candidate.get("backend") == "torch":
        return runnable_here(candidate["precision"])
    if candidate.get("backend") == "openvino":
        from .openvino_backend import unavailable

        return unavailable(name)
    return None


def _torch_model(directory: Path, manifest: ExportManifest) -> Any | None:
    """The export's checkpoint as a model when it is at hand and is the one exported (by hash), else None."""
    from engine.models import file_sha256, load_model

    path = manifest.selection.get("checkpoint")
    if manifest.checkpoint_hash.startswith("random-seed-"):
        return load_model(None, manifest.model, random_weights=True).model
    if not path or not Path(path).is_file() or file_sha256(path) != manifest.checkpoint_hash:
        log.info("export %s: checkpoint %s not at hand (or changed); serving its ONNX towers", directory, path)
        return None
    return load_model(path, manifest.model).model


def _per_tower_encoder(directory: Path, top: ExportManifest, device: str, options: dict[str, Any],
                       towers: dict[str, dict[str, str]]) -> tuple[Encoder, ExportManifest]:
    """Each tower from its chosen precision (see choose_towers); ONNX Runtime sessions only for the towers that
    no torch or OpenVINO choice serves."""
    from .onnx_backend import OnnxEncoder, OrtSettings

    settings = _settings(OrtSettings, options, "onnxruntime")
    dims = top.encoder_dims()
    onnx_dirs = {t: _precision_directory(directory, top, towers[t]["onnx"]) for t in towers}
    manifests = {t: load_manifest(onnx_dirs[t]) for t in towers}
    onnx_paths = {t: onnx_dirs[t] / getattr(manifests[t], t).file for t in towers}
    paths = dict(onnx_paths)  # the file each tower is served from
    served = {t: f"onnx-{towers[t]['onnx']}" for t in towers}
    parts: dict[str, Encoder] = {}
    on_cpu = device == "cpu"  # torch and OpenVINO choices were timed on this CPU; on CUDA the ONNX towers serve
    wanted = {t: towers[t]["chosen"][len("torch-"):] for t in towers if towers[t]["chosen"].startswith("torch-")}
    model = _torch_model(directory, top) if wanted and on_cpu else None
    if model is not None:
        from .torch_backend import TorchEncoder

        built = {p: TorchEncoder(model, top.input_resolution, precision=p, pad_id=top.pad_id)
                 for p in set(wanted.values())}
        parts.update({t: built[p] for t, p in wanted.items()})
        served.update({t: f"torch-{p}" for t, p in wanted.items()})
    openvino = {t: towers[t]["chosen"] for t in towers if towers[t]["chosen"].startswith("openvino-") and on_cpu}
    for name in set(openvino.values()):
        from .openvino_backend import CANDIDATES, OpenVinoEncoder  # openvino is optional: imported when chosen

        mine = [t for t, n in openvino.items() if n == name]
        source = _precision_directory(directory, top, towers[mine[0]]["source"])  # the ONNX files it was timed on
        source_manifest = load_manifest(source)
        files = {t: source / getattr(source_manifest, t).file if t in mine else None for t in ("vision", "text")}
        ov = OpenVinoEncoder(files["vision"], files["text"], hint=CANDIDATES[name][1],
                             threads=settings.intra_op_num_threads, **dims)
        parts.update({t: ov for t in mine})
        served.update({t: name for t in mine})
        paths.update({t: files[t] for t in mine})
    if set(parts) != set(towers):
        onnx = OnnxEncoder(onnx_paths["vision"], onnx_paths["text"], device=device, settings=settings,
                           expected_metadata={t: manifests[t].metadata(t) for t in towers}, **dims)
        parts = {t: parts.get(t, onnx) for t in towers}
    encoder: Encoder = parts["vision"]
    if not all(isinstance(part, OnnxEncoder) for part in parts.values()):
        from .auto_precision import PerTowerEncoder

        encoder = PerTowerEncoder(parts["vision"], parts["text"], served)
    label = served["vision"] if served["vision"] == served["text"] else f"vision {served['vision']}, text {served['text']}"
    manifest = replace(top, precision=label,
                       vision=replace(top.vision, file=str(paths["vision"].relative_to(directory))),
                       text=replace(top.text, file=str(paths["text"].relative_to(directory))))
    return encoder, manifest


def _precision_directory(directory: Path, manifest: ExportManifest, precision: str | None) -> Path:
    """The directory holding `precision`'s towers (an auto export keeps each in its own sub-directory)."""
    candidates = manifest.selection.get("candidates", {})
    if precision is None:
        precision = choose_precision(directory) if candidates else manifest.precision
    if not candidates:
        if precision != manifest.precision:
            raise InputError(f"export {directory} holds precision {manifest.precision!r} only, not {precision!r}")
        return directory
    entry = candidates.get(precision)
    if entry is None or not entry.get("passed"):
        kept = sorted(name for name, c in candidates.items() if c.get("passed"))
        raise InputError(f"export {directory} holds no passing {precision!r} towers; it holds {kept}")
    return directory / entry["directory"]


def open_encoder(directory: str | Path, backend: str = "onnxruntime", device: str = "cpu", model: str | None = None,
                 *, precision: str | None = None, **backend_options: Any) -> tuple[Encoder, ExportManifest]:
    """The encoder and manifest of an export; `model` None takes the manifest's (another model is an error);
    `precision` None serves `choose_precision`'s pick; options are OrtSettings or ProfileConfig fields."""
    top_dir = Path(directory)
    top = load_manifest(top_dir, model)
    towers = choose_towers(top_dir) if precision is None and backend == "onnxruntime" else {}
    if set(towers) == {"vision", "text"}:
        return _per_tower_encoder(top_dir, top, device, backend_options, towers)
    directory = _precision_directory(top_dir, top, precision)
    manifest = top if directory == top_dir else load_manifest(directory, model)
    dims = manifest.encoder_dims()
    if backend == "onnxruntime":
        from .onnx_backend import OnnxEncoder, OrtSettings

        settings = _settings(OrtSettings, backend_options, backend)
        identity = {tower: manifest.metadata(tower) for tower in ("vision", "text")}
        encoder = OnnxEncoder(directory / manifest.vision.file, directory / manifest.text.file, device=device,
                              settings=settings, expected_metadata=identity, **dims)
        return encoder, manifest
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTEncoder
        from .tensorrt_engines import ENGINE_FILES, ProfileConfig, ensure_engines

        if device != "cuda":
            raise InputError(f"the tensorrt backend runs on device 'cuda', got {device!r}")
        engine_dir = ensure_engines(directory, manifest, _settings(ProfileConfig, backend_options, backend))
        encoder = TensorRTEncoder(engine_dir / ENGINE_FILES["vision"], engine_dir / ENGINE_FILES["text"], **dims)
        return encoder, manifest
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
