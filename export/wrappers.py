"""The two cn_clip towers as small export modules with named inputs and outputs.

Outputs are the raw projected embeddings, exactly cn_clip's `encode_image` / `encode_text` (not L2-normalised):
the ONNX files stay drop-in compatible with cn_clip code, and backends normalise in fp32 afterwards.
"""
from __future__ import annotations

import torch
from torch import nn

VISION_INPUT, VISION_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
PAD_ID = 0  # cn_clip's [PAD]; the tokenizer pads with it and the text tower masks it out


class VisionTower(nn.Module):
    """[B, 3, R, R] float32 normalised pixels -> [B, D] image embeddings (cn_clip `encode_image`)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


class TextTower(nn.Module):
    """[B, L] int64 token ids -> [B, D] text embeddings; the attention mask (ids != 0) is computed in the graph."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.bert = clip.bert
        self.text_projection = clip.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask = input_ids.ne(PAD_ID).to(torch.float32)
        hidden = self.bert(input_ids, attention_mask=attention_mask)[0]
        return hidden[:, 0, :] @ self.text_projection
