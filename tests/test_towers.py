"""engine.towers: the batch-first SDPA restatement of cn_clip's towers equals cn_clip's eager forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import build_random_model, get_spec
from engine.towers import TextTower, VisionTower


def _inputs(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images, and three texts of which two are padded (9 and 4 real tokens of 20)."""
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randn(3, 3, resolution, resolution, generator=generator)
    ids = torch.randint(672, 7992, (3, 20), generator=generator)
    ids[:, 0], ids[0, 9:], ids[1, 4:] = 101, 0, 0
    return pixels, ids


@pytest.mark.parametrize("model_name", ["tiny", "RN50"])
def test_towers_restate_cn_clip_exactly(model_name):
    """ViT (tiny) and ResNet (RN50) image towers and both BERT sizes, padding included."""
    spec = get_spec(model_name)
    clip = build_random_model(spec).eval()
    pixels, ids = _inputs(spec.input_resolution)
    with torch.inference_mode():
        torch.testing.assert_close(VisionTower(clip)(pixels), clip.encode_image(pixels), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(TextTower(clip)(ids), clip.encode_text(ids), rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_a_text_embedding():
    clip = build_random_model(get_spec("tiny")).eval()
    _, ids = _inputs(224)
    with torch.inference_mode():
        padded = TextTower(clip)(ids[1:2])
        trimmed = TextTower(clip)(ids[1:2, :4])
    torch.testing.assert_close(padded, trimmed, rtol=1e-4, atol=1e-5)


def test_towers_under_bf16_autocast_stay_close_to_fp32():
    """The dtype plumbing of the low-precision path (mask, LayerNorm, SDPA) on CPU autocast; CUDA uses the same."""
    clip = build_random_model(get_spec("tiny")).eval()
    pixels, ids = _inputs(224)
    with torch.inference_mode():
        reference = clip.encode_image(pixels), clip.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = VisionTower(clip)(pixels), TextTower(clip)(ids)
    for want, got in zip(reference, low):
        assert got.dtype == torch.bfloat16
        assert F.cosine_similarity(got.float(), want).min() > 0.99
