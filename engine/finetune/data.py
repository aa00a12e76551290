"""Training pairs: a split read through engine.datasets (evaluation's reader too), a seeded batch plan, and the
pixel loader.

Each epoch visits every usable text once (a seeded permutation) and pairs it with one of its images drawn at
random, so a text with several images and an image with several texts are both covered. The plan is a pure
function of (seed, step): resuming at step s replays exactly the batches an uninterrupted run would see, on
any number of ranks (rank r takes slice r of each global batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ImageDecodeError, InputError
from ..datasets import Dataset, DatasetError, ImageRecord, Problem, TextRecord, read_dataset, undecodable
from ..preprocess import DEFAULT_MAX_PIXELS, ImageTransform, Tokenizer


@dataclass
class Split:
    """The usable texts of one split, their images, and what was skipped (empty unless skip_bad)."""

    name: str
    texts: list[TextRecord]
    images: list[ImageRecord]
    text_images: list[tuple[int, ...]]  # per text, indices into `images`
    skipped: list[Problem]
    dataset: Dataset  # as engine.eval read it (validation scores through engine.eval's feature code)


def load_split(data: str | Path, split: str, layout: str = "auto", skip_bad: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Split:
    """Read a split the way `engine.eval` does; every image is decoded once up front so that a bad one fails
    the run before training (or, with `skip_bad`, is skipped with its texts and reported)."""
    dataset = read_dataset(data, split, layout)
    problems = list(dataset.problems)
    usable: list[ImageRecord] = []
    for record in dataset.images:
        try:
            record.decode(max_pixels)
            usable.append(record)
        except ImageDecodeError as exc:
            problems.append(undecodable(record, exc))
    if problems and not skip_bad:
        raise DatasetError(problems)
    kept, dropped = dataset.evaluable_texts({r.id for r in usable})
    if not kept:
        raise InputError(f"split {split!r} in {data} has no usable text-image pairs "
                         f"({len(dataset.texts)} texts read, {len(problems)} problems)")
    position = {r.id: i for i, r in enumerate(usable)}
    text_images = [tuple(position[i] for i in r.image_ids) for r in kept]
    return Split(split, kept, usable, text_images, problems + dropped, dataset)


class BatchPlan:
    """Which (text, image) pairs make up global batch `step`, drawn from (seed, epoch) alone."""

    def __init__(self, text_images: Sequence[tuple[int, ...]], batch_size: int, seed: int) -> None:
        if len(text_images) < batch_size:
            raise InputError(f"the training split has {len(text_images)} usable texts (pairs per epoch), fewer "
                             f"than the batch size {batch_size}; lower --batch-size or add data")
        self.text_images = [tuple(t) for t in text_images]
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(text_images) // batch_size
        self._cached: tuple[int, torch.Tensor, list[int]] | None = None

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.text_images), generator=gen)
            draws = torch.rand(len(self.text_images), generator=gen, dtype=torch.float64).tolist()
            images = [t[min(int(d * len(t)), len(t) - 1)] for t, d in zip(self.text_images, draws)]
            self._cached = (epoch, order, images)
        return self._cached[1], self._cached[2]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> tuple[list[int], list[int]]:
        """(text indices, image indices) of the global batch at 0-based `step`."""
        order, images = self._epoch(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.batch_size
        texts = order[start:start + self.batch_size].tolist()
        return texts, [images[t] for t in texts]

    def positives(self, texts: Sequence[int], images: Sequence[int]) -> torch.Tensor:
        """[B, B] bool: text i matches image j (the diagonal, plus duplicates and other true pairs).

        Built from each text's few images (O(B x images per text)), not by testing all B x B pairs."""
        columns: dict[int, list[int]] = {}
        for j, image in enumerate(images):
            columns.setdefault(image, []).append(j)
        rows, cols = [], []
        for i, text in enumerate(texts):
            for image in self.text_images[text]:
                for j in columns.get(image, ()):
                    rows.append(i)
                    cols.append(j)
        mask = torch.zeros(len(texts), len(images), dtype=torch.bool)
        mask[rows, cols] = True
        return mask


class RankBatches(Sampler):
    """Image indices of this rank's slice of each global batch, for steps start..end-1."""

    def __init__(self, plan: BatchPlan, start: int, end: int, rank: int, world_size: int) -> None:
        self.plan, self.start, self.end = plan, start, end
        self.local = plan.batch_size // world_size
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local
        for step in range(self.start, self.end):
            yield self.plan.global_batch(step)[1][lo:lo + self.local]


class PixelSet(torch.utils.data.Dataset):
    """Decoded, transformed images by index (cn_clip's exact transform; no augmentation)."""

    def __init__(self, images: Sequence[ImageRecord], resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.images = list(images)
        self.transform = ImageTransform(resolution)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index].decode(self.max_pixels))


def pixel_loader(images: PixelSet, sampler: RankBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """Batches of [b, 3, R, R] pixels in the sampler's order (worker processes keep the order).

    The loader gets its own generator: creating an iterator draws a worker seed from it, and drawing from the
    global one would shift the dropout masks of a resumed run."""
    return DataLoader(images, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


def tokenize_texts(texts: Sequence[TextRecord], context_length: int) -> torch.Tensor:
    """[n, L] token ids of every text, through the engine's Tokenizer (cn_clip's normalisation included)."""
    return Tokenizer(context_length)([r.text for r in texts]).ids


def batch_length(ids: torch.Tensor, pad_id: int = 0) -> int:
    """Longest real row in a [b, L] token batch (at least 1)."""
    real = ids.ne(pad_id).any(dim=0).nonzero()
    return int(real.max()) + 1 if len(real) else 1
