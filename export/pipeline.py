"""`export_model`: checkpoint -> ONNX (and TensorRT) towers + manifest.json, gated on parity with fp32 PyTorch.

`precision="auto"` builds every candidate precision from one fp32 export, gates each on parity, times each tower
of each on this machine with repeats, and keeps those that pass, each in its own sub-directory. The torch
precisions this CPU runs (bf16 and bf16-compiled with bf16 units, int8-text with the extension) are gated and timed
the same way from the checkpoint, and so is OpenVINO's CPU plugin on the passing ONNX files where openvino is
installed (fp32, the bf16 hint on bf16 hardware, the int8 graphs). Each tower is then chosen on its own by the noise rule of
engine.backends.auto_precision (a candidate wins only by more than the measured spread). The top-level manifest
describes the fastest ONNX precision overall (the legacy single choice) and records, in `selection`, every
candidate's samples and parity per tower, the per-tower choices and a one-line summary.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.backends import Encoder
from engine.backends.auto_precision import (TOWERS, TowerCandidate, choose_tower, choose_towers,
                                            openvino_candidates, summary_line, torch_candidates)
from engine.backends.candidate_timing import BURST, TimingPool
from engine.backends.base import trim_padding
from engine.backends.cpu_features import cpu_info
from engine.backends.export_manifest import MANIFEST_NAME, ExportManifest, TowerEntry
from engine.backends.export_reader import open_encoder
from engine.backends.openvino_backend import GATE_PRECISION as OPENVINO_GATES
from engine.backends.versions import package_versions
from engine.errors import InputError
from engine.install_hints import require
from engine.models import LoadedModel, load_model
from engine.preprocess import DEFAULT_CONTEXT_LENGTH
from engine.towers import PAD_ID

from .onnx_export import (ONNXRUNTIME_OPSET, PRECISIONS, TENSORRT_OPSET, Calibration, TowerFiles, build_towers,
                          convert, stamp_metadata)
from .parity import (THRESHOLDS, ParityError, ParityInputs, check, generated_pixels, generated_token_ids, lowest,
                     Reference, measure, reference, user_pixels, user_token_ids)
from .tensor_names import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT
from .timing import query_token_ids

FORMATS = ("onnx", "tensorrt")
AUTO = "auto"
AUTO_CANDIDATES = {"onnx": ("fp32", "int8", "int8-static"), "tensorrt": ("fp32", "fp16")}
AUTO_TORCH = ("bf16", "bf16-compiled", "int8-text")  # torch fp32 is the reference: never faster than ONNX fp32
AUTO_REPEATS = 5
TENSORRT_PRECISIONS = ("fp32", "fp16")
# what every export runs (torch.onnx.export, fp16 conversion, ONNX Runtime parity and quantisation): the onnx extra
EXPORT_MODULES = ("onnx", "onnxscript", "onnxruntime", "onnxconverter_common")


@dataclass
class _Job:
    """What every precision of one export shares: the model, the parity inputs and their fp32 reference."""

    model: str
    loaded: LoadedModel
    fmt: str
    context_length: int
    inputs: ParityInputs
    min_cosine: float | None
    checkpoint: str | None = None

    @property
    def opset(self) -> int:
        return ONNXRUNTIME_OPSET if self.fmt == "onnx" else TENSORRT_OPSET

    @property
    def runtime(self) -> tuple[str, str]:
        return ("onnxruntime", "cpu") if self.fmt == "onnx" else ("tensorrt", "cuda")


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise InputError(f"--out {out} exists and is not an export directory; choose a new or empty directory")


def _check_arguments(fmt: str, precision: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    allowed = (*PRECISIONS, AUTO) if fmt == "onnx" else (*TENSORRT_PRECISIONS, AUTO)
    if precision not in allowed:
        raise InputError(f"precision for {fmt} must be one of {allowed}, got {precision!r}")


def _publish_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the finished export the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _calibration(inputs: ParityInputs, resolution: int, context_length: int) -> Calibration:
    """Static int8's calibration batches: generated samples (other seeds than the parity set's) and the user's."""
    given_pixels, given_ids = inputs.pixels.get("user"), inputs.token_ids.get("user")
    pixels = torch.cat([generated_pixels(resolution, 16, seed=1), *([] if given_pixels is None else [given_pixels])])
    ids = torch.cat([generated_token_ids(context_length, 32, seed=1), *([] if given_ids is None else [given_ids])])
    return Calibration([pixels[i:i + 4].numpy() for i in range(0, len(pixels), 4)],
                       [trim_padding(ids[i:i + 8].numpy()) for i in range(0, len(ids), 8)])


def _write_manifest(job: _Job, precision: str, files: TowerFiles, directory: Path) -> ExportManifest:
    """The manifest of `files` (stamped into each ONNX file too), saved in `directory`."""
    spec = job.loaded.spec
    resolution = spec.input_resolution
    manifest = ExportManifest(
        model=job.model, checkpoint_hash=job.loaded.checkpoint_hash, precision=precision, opset=job.opset,
        embed_dim=int(spec.config()["embed_dim"]), input_resolution=resolution, context_length=job.context_length,
        vision=TowerEntry(os.path.relpath(files.vision, directory), VISION_INPUT, VISION_OUTPUT,
                          ["batch", 3, resolution, resolution], "float32"),
        text=TowerEntry(os.path.relpath(files.text, directory), TEXT_INPUT, TEXT_OUTPUT, ["batch", "sequence"],
                        "int64"),
        pad_id=PAD_ID, versions={k: v for k, v in package_versions().items() if v is not None})
    for tower, path in files.items():
        stamp_metadata(path, manifest.metadata(tower))
    manifest.save(directory)
    return manifest


def _gate(job: _Job, manifest: ExportManifest, directory: Path, ref: Reference) -> Encoder:
    """Open the export in `directory`, record its parity in the manifest, and raise ParityError below threshold."""
    backend, device = job.runtime
    encoder, _ = open_encoder(directory, backend, device)
    threshold = THRESHOLDS[manifest.precision] if job.min_cosine is None else job.min_cosine
    report = measure(ref, encoder, job.inputs)
    manifest.parity = {"backend": backend, "device": device, "threshold": threshold, **report}
    manifest.save(directory)
    check(report, threshold)
    return encoder


def _export_one(job: _Job, precision: str, staging: Path, calibration: Calibration | None) -> ExportManifest:
    spec = job.loaded.spec
    files = build_towers(job.loaded.model, spec.input_resolution, spec.config()["text_max_position_embeddings"],
                         precision, staging, job.opset, calibration)
    manifest = _write_manifest(job, precision, files, staging)
    _gate(job, manifest, staging, reference(job.loaded.model, job.inputs))
    return manifest


def _tower_min(parity: dict, tower: str) -> float:
    return min(s["min"] for s in parity[tower].values())


def _export_auto(job: _Job, staging: Path, calibration: Calibration) -> ExportManifest:
    """Every candidate precision in its own sub-directory of `staging`; failing ones removed; the fastest passing
    one described by the returned top-level manifest, the per-tower choices recorded in its selection."""
    spec = job.loaded.spec
    ref = reference(job.loaded.model, job.inputs)
    pixels = job.inputs.pixels["generated"][:8]
    query = query_token_ids(job.context_length)[:1]  # a search query: one text of 8 tokens
    fp32_dir = staging / "fp32"
    fp32_dir.mkdir()
    fp32 = build_towers(job.loaded.model, spec.input_resolution, spec.config()["text_max_position_embeddings"],
                        "fp32", fp32_dir, job.opset)
    candidates: dict[str, dict] = {}
    manifests: dict[str, ExportManifest] = {}
    towers: dict[str, list[TowerCandidate]] = {t: [] for t in TOWERS}
    pool = TimingPool(pixels, query, AUTO_REPEATS)  # every passing candidate is timed with the others
    onnx_timed: dict[str, dict[str, TowerCandidate]] = {}  # passing precision -> its per-tower candidates
    backend, device = job.runtime
    for precision in AUTO_CANDIDATES[job.fmt]:
        directory = staging / precision
        directory.mkdir(exist_ok=True)
        files = fp32 if precision == "fp32" else convert(fp32, precision, directory, calibration)
        manifest = _write_manifest(job, precision, files, directory)
        entry: dict = {"directory": precision}
        per_tower = {t: TowerCandidate(f"{job.fmt}-{precision}", backend, precision) for t in TOWERS}
        try:
            encoder = _gate(job, manifest, directory, ref)
        except ParityError as exc:
            entry.update(passed=False, reason=str(exc))
            for cand in per_tower.values():
                cand.reason = str(exc)
        else:
            pool.add(per_tower, encoder)
            onnx_timed[precision] = per_tower
            entry["passed"] = True
            manifests[precision] = manifest
        entry.update(min_cosine=lowest(manifest.parity), threshold=manifest.parity["threshold"])
        candidates[precision] = entry
        for tower, cand in per_tower.items():
            cand.threshold, cand.min_cosine = manifest.parity["threshold"], _tower_min(manifest.parity, tower)
            towers[tower].append(cand)
    for precision, entry in candidates.items():
        if not entry["passed"] and precision != "fp32":
            shutil.rmtree(staging / precision)
    if not manifests:
        raise ParityError(f"no precision passed parity: {'; '.join(c['reason'] for c in candidates.values())}")
    if job.fmt == "onnx":
        def parity(encoder: Encoder) -> dict[str, float]:
            report = measure(ref, encoder, job.inputs)
            return {t: _tower_min(report, t) for t in TOWERS}

        overrides = None if job.min_cosine is None else {p: job.min_cosine for p in AUTO_TORCH}
        timed, _ = torch_candidates(job.loaded.model, spec.input_resolution, parity, pool, AUTO_TORCH, overrides)
        files = {p: (staging / p / m.vision.file, staging / p / m.text.file) for p, m in manifests.items()}
        gates = {name: THRESHOLDS[gate] if job.min_cosine is None else job.min_cosine
                 for name, gate in OPENVINO_GATES.items()}
        dims = next(iter(manifests.values())).encoder_dims()  # every precision shares them
        openvino = openvino_candidates(files, dims, parity, gates, pool)
        for tower in TOWERS:
            towers[tower] += timed[tower] + openvino[tower]
    pool.flush()
    for precision, per_tower in onnx_timed.items():
        vision_s, text_s = per_tower["vision"].median, per_tower["text"].median
        candidates[precision].update(vision_s=vision_s, text_s=text_s, seconds=vision_s + text_s)
    choices = choose_towers(towers)
    exported = {t: choose_tower([c for c in towers[t] if c.backend == backend]) for t in TOWERS}
    chosen = min(manifests, key=lambda p: candidates[p]["seconds"])
    if not candidates["fp32"]["passed"]:
        shutil.rmtree(fp32_dir)
    best = manifests[chosen]
    tower_selection = {t: {"chosen": choices[t].name, f"chosen_{backend}": exported[t].name,
                           "candidates": {c.name: c.as_dict() for c in towers[t]}} for t in TOWERS}
    return replace(best, vision=replace(best.vision, file=f"{chosen}/{best.vision.file}"),
                   text=replace(best.text, file=f"{chosen}/{best.text.file}"),
                   selection={"chosen": chosen, "rule": "fastest passing: least seconds for the workload",
                              "workload": f"{len(pixels)} images, and 1 query of "
                                          f"{int(query.ne(PAD_ID).sum(1).max())} tokens; median of "
                                          f"{AUTO_REPEATS} rotating rounds per tower (each the fastest of "
                                          f"{BURST} calls) after a warm-up",
                              "tower_rule": "per tower: the first passing candidate (ONNX fp32) unless another's "
                                            "median is lower by more than the larger spread (median - min of the "
                                            "repeats) of the two",
                              "backend": backend, "device": device, "machine": cpu_info().as_dict(),
                              "threads": torch.get_num_threads(), "candidates": candidates,
                              "towers": tower_selection, "checkpoint": job.checkpoint,
                              "summary": summary_line(choices, towers)})


def export_model(model: str, out: str | Path, checkpoint: str | Path | None = None, fmt: str = "onnx",
                 precision: str = "fp32", images: str | Path | None = None, texts: str | Path | None = None,
                 min_cosine: float | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH, *,
                 random_weights: bool = False) -> ExportManifest:
    """Export `model`'s towers into `out`; raises ParityError (nothing written) when parity is below threshold
    (for `precision="auto"`: when no candidate passes). `random_weights`: the model's structure with seeded random
    weights instead of a checkpoint (timing an export without downloading one)."""
    _check_arguments(fmt, precision)
    require(EXPORT_MODULES, "onnx", "an export")
    out = Path(out)
    _check_target(out)
    loaded = load_model(checkpoint, model, random_weights=random_weights)
    resolution = loaded.spec.input_resolution
    inputs = ParityInputs({"generated": generated_pixels(resolution)},
                          {"generated": generated_token_ids(context_length)})
    if images is not None:
        inputs.pixels["user"] = user_pixels(images, resolution)
    if texts is not None:
        inputs.token_ids["user"] = user_token_ids(texts, context_length)
    calibration = _calibration(inputs, resolution, context_length) if precision in (AUTO, "int8-static") else None
    job = _Job(model, loaded, fmt, context_length, inputs, min_cosine,
               None if checkpoint is None else str(Path(checkpoint).resolve()))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        if precision == AUTO:
            manifest = _export_auto(job, staging, calibration)
        else:
            manifest = _export_one(job, precision, staging, calibration)
        manifest.save(staging)
        _publish_permissions(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
