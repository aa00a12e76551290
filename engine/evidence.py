"""Crop evidence for image hits of a LACLIP index: each of the K crops' box in the original image's pixels, its
similarity to the query, and its weight under the scoring used (the weights sum to 1).

Weights: image weights softmax_j(c_j . g / tau); query-aware softmax_j(c_j . q / tau); plain CLIP (alpha = 1, or
image -> image by global vectors) uniform 1/K, as the crops do not count toward the score; best-crop search
(against="crops") puts weight 1 on the crop that matched. "best" is the crop with the largest weight x similarity
(for best-crop search: the crop that matched). Boxes are recomputed from the geometry recorded at add time
(width, height, crop seed) and the index's crop settings; rows without it get boxes of null and a note.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .laclip import CropConfig, ScoreConfig, crop_boxes, image_weights
from .scoring import crop_similarities, is_plain

NO_GEOMETRY = ("the image's size was not recorded (indexed from vectors, by a Ray job, or before sizes were "
               "recorded): no boxes")


def crop_evidence(q: np.ndarray, g: np.ndarray, c: np.ndarray, geometry: np.ndarray, crops: CropConfig,
                  score: ScoreConfig | None, against_crops: bool = False) -> list[dict[str, Any]]:
    """Evidence for n images (g [n, D], c [n, K, D], geometry [n, 3]) against one query vector q [D]."""
    gt, ct = torch.from_numpy(np.asarray(g, np.float32)), torch.from_numpy(np.asarray(c, np.float32))
    sims = crop_similarities(torch.from_numpy(np.asarray(q, np.float32))[None], ct)[0]  # [n, K]
    k = ct.shape[1]
    if against_crops:
        weights = torch.nn.functional.one_hot(sims.argmax(dim=1), k).float()
    elif is_plain(score):
        weights = torch.full_like(sims, 1.0 / k)
    elif score.weights == "image":
        weights = image_weights(gt, ct, score.tau)
    else:
        weights = torch.softmax(sims / score.tau, dim=1)
    best = (sims.argmax(dim=1) if against_crops else (weights * sims).argmax(dim=1)).tolist()
    out = []
    for i, (width, height, seed) in enumerate(np.asarray(geometry, np.int64).tolist()):
        boxes = crop_boxes(width, height, crops, seed) if width > 0 else [None] * k
        item: dict[str, Any] = {
            "image_size": [width, height] if width > 0 else None, "best": int(best[i]),
            "crops": [{"box": None if box is None else list(box), "similarity": float(sims[i, j]),
                       "weight": float(weights[i, j])} for j, box in enumerate(boxes)]}
        if width <= 0:
            item["note"] = NO_GEOMETRY
        out.append(item)
    return out
