"""Export the two towers to ONNX (dynamic batch and text length), then convert to fp16 or int8.

The opset depends on who runs the files: ONNX Runtime gets opset 23, where attention is one `Attention` node;
TensorRT gets opset 18, where attention stays MatMul/Softmax/MatMul, the pattern its builder fuses.

fp16 keeps LayerNormalization (statistics and affine) in fp32 with fp32 graph inputs/outputs; int8 is ONNX
Runtime dynamic quantisation of the MatMul weights (per channel) and int8-static a calibrated QDQ graph
(export.quantize), both meant for CPU serving.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine.errors import InputError
from engine.towers import TextTower, VisionTower

from .quantize import quantize_dynamic_int8, quantize_static_int8
from .tensor_names import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT

ONNXRUNTIME_OPSET = 23
TENSORRT_OPSET = 18
Precision = Literal["fp32", "fp16", "int8", "int8-static"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-static")
EXTERNAL_DATA_BYTES = 1_500_000_000  # towers above this keep weights in a side file (protobuf's 2 GB limit)
# Ops whose fp16 versions lose the accuracy that matters (Chinese-CLIP issue 165): kept in fp32.
FP16_BLOCK_LIST = ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Erf", "Softmax", "Range", "Equal"]


@dataclass(frozen=True)
class TowerFiles:
    """Paths of one export's two ONNX files."""

    vision: Path
    text: Path

    def items(self) -> list[tuple[str, Path]]:
        return [("vision", self.vision), ("text", self.text)]


@dataclass
class Calibration:
    """Input batches for static int8's activation ranges: pixel batches and (padding-trimmed) token-id batches."""

    pixels: list[np.ndarray] = field(default_factory=list)
    token_ids: list[np.ndarray] = field(default_factory=list)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
            dynamic: dict[int, torch.export.Dim], opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), input_names=[input_name], output_names=[output_name],
                                    opset_version=opset, dynamo=True, dynamic_shapes=(dynamic,), verbose=False,
                                    optimize=True)
    program.save(str(path), external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES)


def export_fp32(clip: torch.nn.Module, input_resolution: int, max_sequence: int, files: TowerFiles,
                opset: int = ONNXRUNTIME_OPSET) -> TowerFiles:
    """Write fp32 vision and text ONNX files to `files`; batch is dynamic, and text length is 2..max_sequence."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=max_sequence)
    vision, text = files.vision, files.text
    pixels = torch.randn(2, 3, input_resolution, input_resolution)
    _export(VisionTower(clip), pixels, vision, VISION_INPUT, VISION_OUTPUT, {0: batch}, opset)
    ids = torch.randint(1, 1000, (2, min(8, max_sequence)))
    _export(TextTower(clip), ids, text, TEXT_INPUT, TEXT_OUTPUT, {0: batch, 1: seq}, opset)
    return TowerFiles(vision, text)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute; LayerNorm, softmax and the mask kept in fp32; fp32 inputs and outputs."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_BLOCK_LIST)
    _retype_casts(half)
    _save(half, dst)


def _retype_casts(model) -> None:
    """onnxconverter-common marks a Cast-to-fp32's output fp16 but keeps to=FLOAT (e.g. the text mask): align them."""
    from onnx import TensorProto

    half = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in half:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def _save(model, dst: Path) -> None:
    import onnx

    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(model, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)


def stamp_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Record `metadata` (model name, checkpoint hash, precision, tower) in the ONNX file's metadata_props."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))


def convert(fp32: TowerFiles, precision: str, out_dir: Path, calibration: Calibration | None = None) -> TowerFiles:
    """`fp32`'s towers converted to `precision` (not fp32) in `out_dir`/vision.onnx and text.onnx."""
    final = TowerFiles(out_dir / "vision.onnx", out_dir / "text.onnx")
    for tower, src in fp32.items():
        dst = getattr(final, tower)
        large = os.path.getsize(src) > EXTERNAL_DATA_BYTES
        if precision == "fp16":
            convert_fp16(src, dst)
        elif precision == "int8":
            quantize_dynamic_int8(src, dst, large)
        elif precision == "int8-static":
            if calibration is None:
                raise InputError("precision int8-static needs calibration inputs")
            batches = calibration.pixels if tower == "vision" else calibration.token_ids
            quantize_static_int8(src, dst, VISION_INPUT if tower == "vision" else TEXT_INPUT, batches, large)
        else:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return final


def build_towers(clip: torch.nn.Module, input_resolution: int, max_sequence: int, precision: str,
                 out_dir: Path, opset: int = ONNXRUNTIME_OPSET, calibration: Calibration | None = None) -> TowerFiles:
    """Write both towers at `precision` to `out_dir`/vision.onnx and text.onnx (fp32 intermediates in a temp dir)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    final = TowerFiles(out_dir / "vision.onnx", out_dir / "text.onnx")
    if precision == "fp32":
        return export_fp32(clip, input_resolution, max_sequence, final, opset)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        fp32 = export_fp32(clip, input_resolution, max_sequence,
                           TowerFiles(Path(tmp) / "vision.onnx", Path(tmp) / "text.onnx"), opset)
        return convert(fp32, precision, out_dir, calibration)
