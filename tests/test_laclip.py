"""LACLIP reference: hand-computed cases, the pooled-vector identity, config checks, seeded crops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_image
from engine import InputError, LaclipConfig, Retriever
from engine.laclip import ScoreConfig, crop_boxes, laclip_scores_reference, laclip_topk_reference, pooled_vectors
from engine.preprocess import content_seed

# One image: g = e1; crops c1 = e1, c2 = e2 (K = 2, D = 2). One text t = (0.6, 0.8).
G = torch.tensor([[1.0, 0.0]])
C = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
T = torch.tensor([[0.6, 0.8]])


def test_hand_computed_image_weights():
    # c.g = (1, 0); with tau = 1: w = (e/(e+1), 1/(e+1)); c.t = (0.6, 0.8); g.t = 0.6
    w1 = math.e / (math.e + 1)
    local = w1 * 0.6 + (1 - w1) * 0.8
    for alpha in (0.0, 0.5, 1.0):
        got = laclip_scores_reference(T, G, C, alpha=alpha, tau=1.0, weights="image").item()
        assert got == pytest.approx(alpha * 0.6 + (1 - alpha) * local, abs=1e-6)


def test_hand_computed_text_weights():
    # weights from c.t / tau = (0.6, 0.8) / 0.5 = (1.2, 1.6)
    w1 = math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))
    local = w1 * 0.6 + (1 - w1) * 0.8
    got = laclip_scores_reference(T, G, C, alpha=0.25, tau=0.5, weights="text").item()
    assert got == pytest.approx(0.25 * 0.6 + 0.75 * local, abs=1e-6)


def test_alpha_one_is_plain_clip_and_low_tau_picks_the_best_crop():
    assert laclip_scores_reference(T, G, C, alpha=1, tau=0.1, weights="text").item() == pytest.approx(0.6)
    assert laclip_scores_reference(T, G, C, alpha=0, tau=1e-4, weights="text").item() == pytest.approx(0.8)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("alpha, tau", [(0.0, 0.05), (0.5, 0.1), (1.0, 1.0), (0.3, 0.01)])
def test_pooled_vectors_equal_the_direct_formula(alpha, tau):
    t, g, c = _unit(9, 64, seed=1), _unit(33, 64, seed=2), _unit(33, 5, 64, seed=3)
    direct = laclip_scores_reference(t, g, c, alpha=alpha, tau=tau, weights="image")
    pooled = t @ pooled_vectors(g, c, alpha=alpha, tau=tau).T
    assert torch.allclose(pooled, direct, atol=1e-5)


def test_topk_reference_breaks_ties_by_lower_index():
    g = torch.cat([G, G, G])
    c = torch.cat([C, C, C])
    values, indices = laclip_topk_reference(T, g, c, k=2, alpha=0.5, tau=1, weights="image")
    assert indices.tolist() == [[0, 1]]
    assert values[0, 0] == values[0, 1]


@pytest.mark.parametrize("kwargs, field", [
    ({"num_crops": 0}, "num_crops"), ({"tau": 0}, "tau"), ({"alpha": 1.5}, "alpha"),
    ({"weights": "both"}, "weights"), ({"crop_area": (0.5, 0.2)}, "crop_area"),
    ({"crop_aspect": (0, 1)}, "crop_aspect"), ({"crop_mode": "grid", "num_crops": 5}, "square"),
    ({"crop_mode": "spiral"}, "crop_mode"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(InputError, match=field):
        LaclipConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = LaclipConfig(num_crops=9, crop_mode="grid", tau=0.2, weights="text")
    assert LaclipConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("width, height", [(92, 96), (1887, 366), (3, 700), (1, 1)])
def test_random_crops_are_inside_the_image_and_reproducible(width, height):
    config = LaclipConfig(num_crops=9)
    boxes = crop_boxes(width, height, config, image_seed=42)
    assert boxes == crop_boxes(width, height, config, image_seed=42)
    assert boxes != crop_boxes(width, height, LaclipConfig(num_crops=9, seed=1), image_seed=42) or width * height < 4
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        area = (right - left) * (bottom - top) / (width * height)
        assert area <= 1.0


def test_random_crop_areas_follow_the_range():
    config = LaclipConfig(num_crops=64, crop_area=(0.3, 0.4), crop_aspect=(1, 1))
    areas = [(r - l) * (b - t) / 1e6 for l, t, r, b in crop_boxes(1000, 1000, config, image_seed=3)]
    assert 0.29 <= min(areas) and max(areas) <= 0.41


def test_grid_crops_tile_the_image():
    boxes = crop_boxes(100, 61, LaclipConfig(num_crops=4, crop_mode="grid"), image_seed=0)
    assert boxes == [(0, 0, 50, 30), (50, 0, 100, 30), (0, 30, 50, 61), (50, 30, 100, 61)]


def test_content_seed_depends_on_pixels_not_object_identity():
    a, b = make_image(50, 40, seed=1), make_image(50, 40, seed=1)
    assert content_seed(a) == content_seed(b)
    assert content_seed(a) != content_seed(make_image(50, 40, seed=2))


def test_same_image_twice_gives_identical_crops_and_embeddings(tiny_checkpoint, tmp_path):
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=3),
                                          progress=False)
    image = make_image(321, 123, "RGBA", seed=9)
    image.save(tmp_path / "x.png")
    first = retriever.encode_image_views([image])
    second = retriever.encode_image_views([tmp_path / "x.png"])
    assert first.crops.shape == (1, 3, 32)
    assert np.array_equal(first.global_, second.global_) and np.array_equal(first.crops, second.crops)
    assert not np.allclose(first.crops[0, 0], first.crops[0, 1])


def test_settings_split_into_crop_and_score_parts():
    from engine.laclip import CropConfig, ScoreConfig

    config = LaclipConfig(num_crops=9, crop_mode="grid", tau=0.05, alpha=0.2, weights="text", seed=3)
    assert config.crops == CropConfig(num_crops=9, crop_mode="grid", seed=3)
    assert config.score == ScoreConfig(tau=0.05, alpha=0.2, weights="text")
    assert LaclipConfig.from_parts(config.crops, config.score) == config
    assert LaclipConfig.from_dict(config.to_dict()) == config
    assert ScoreConfig(alpha=1.0).plain and not ScoreConfig().plain


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("engine").ScoreConfig(tau=float("nan")), "tau"),
    (lambda: __import__("engine").ScoreConfig(alpha=True), "alpha must be a number"),
    (lambda: __import__("engine").ScoreConfig(weights="crop"), "weights"),
    (lambda: __import__("engine").CropConfig(num_crops=3, crop_mode="grid"), "square"),
    (lambda: LaclipConfig(tau=-1), "tau"),
])
def test_bad_settings_are_named(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_tau_has_a_lower_bound_that_keeps_scores_finite():
    """tau = 1e-40 gave an HTTP 500 (an overflowing softmax); below MIN_TAU it is an InputError naming the bound,
    and at the bound both weight modes score finitely."""
    from engine.laclip import MIN_TAU

    with pytest.raises(InputError, match=f"{MIN_TAU:g}"):
        ScoreConfig(tau=1e-40)
    with pytest.raises(InputError, match="tau"):
        LaclipConfig(tau=MIN_TAU / 2)
    gen = torch.Generator().manual_seed(0)
    t, g = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1), \
        torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(20, 4, 8, generator=gen), dim=-1)
    for weights in ("image", "text"):
        config = ScoreConfig(tau=MIN_TAU, alpha=0.0, weights=weights)
        scores = laclip_scores_reference(t, g, c, alpha=config.alpha, tau=config.tau, weights=weights)
        assert torch.isfinite(scores).all()
        assert torch.isfinite(pooled_vectors(g, c, alpha=0.0, tau=config.tau)).all()
