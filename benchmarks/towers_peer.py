"""The peer row of the towers benchmark: cn_clip's own deployment export, reproduced with its own settings.

cn_clip/deploy/pytorch_to_onnx.py exports the whole CLIP module with the legacy TorchScript exporter at opset 13
(vision without constant folding), from a batch-1 image and one text padded to 52 tokens, and declares no
dynamic axes: every call takes one image, or one text padded to 52. One deviation: with today's torch the
vision tower's nn.MultiheadAttention runs aten::scaled_dot_product_attention, which the legacy exporter cannot
write below opset 14, so the script as published fails there; the vision file uses opset 14 (the lowest that
works), the text file the script's 13. PeerEncoder serves those files the way a
user of that export must: one row per call, texts padded to 52. This is what users pick today.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from engine.backends.base import l2_normalize

PEER_OPSET = {"vision": 14, "text": 13}
PEER_CONTEXT = 52
VISION_FILE, TEXT_FILE = "vitb16.img.fp32.onnx", "vitb16.txt.fp32.onnx"


def export_peer(clip: torch.nn.Module, resolution: int, directory: Path) -> tuple[Path, Path]:
    """Write the peer's vision and text fp32 ONNX files into `directory` with pytorch_to_onnx.py's arguments."""
    directory.mkdir(parents=True, exist_ok=True)
    clip = clip.float().eval()
    image = torch.zeros(1, 3, resolution, resolution)
    text = torch.zeros(1, PEER_CONTEXT, dtype=torch.long)
    text[0, :2] = torch.tensor([101, 102])  # clip.tokenize([""]): [CLS] [SEP] then padding
    vision, text_path = directory / VISION_FILE, directory / TEXT_FILE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(clip, (image, None), str(vision), input_names=["image"],
                          output_names=["unnorm_image_features"], export_params=True, do_constant_folding=False,
                          opset_version=PEER_OPSET["vision"], dynamo=False)
        torch.onnx.export(clip, (None, text), str(text_path), input_names=["text"],
                          output_names=["unnorm_text_features"], export_params=True,
                          opset_version=PEER_OPSET["text"], dynamo=False)
    return vision, text_path


class PeerEncoder:
    """The Encoder protocol over the peer's files: batch fixed at 1, texts padded (or cut) to 52 tokens."""

    def __init__(self, directory: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.vision = ort.InferenceSession(str(directory / VISION_FILE), options, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(directory / TEXT_FILE), options, providers=["CPUExecutionProvider"])

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        rows = [self.vision.run(None, {"image": p[None].numpy()})[0] for p in pixels]
        return l2_normalize(np.concatenate(rows))

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        ids = np.zeros((len(token_ids), PEER_CONTEXT), np.int64)
        length = min(PEER_CONTEXT, token_ids.shape[1])
        ids[:, :length] = token_ids[:, :length].numpy()
        rows = [self.text.run(None, {"text": row[None]})[0] for row in ids]
        return l2_normalize(np.concatenate(rows))
