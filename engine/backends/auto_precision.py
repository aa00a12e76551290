"""`--precision auto`, per tower: time every precision this machine can run, keep those that pass parity, and
choose for each tower the fastest that wins by more than the measured noise.

The rule (`choose_tower`): candidates are listed in preference order, simplest first (ONNX fp32 before the
quantised graphs, the ONNX export before the torch precisions); the first that passes parity is the default. The
candidates of a tower are timed together in `repeats` rotating rounds (candidate_timing: a slow stretch of a
shared machine falls on all of them alike); a candidate's spread is median - min of its rounds. The noise is
one-sided (other work only ever makes a call slower), so the spread is read on the fast side: calls disturbed
by other work, up to half of them, neither move the median nor widen the spread (on the AVX2 EPYC two stalled
calls among ONNX fp32's five text calls made max - min 21 ms and the interquartile range 19.5 ms, either of which
hid a text tower 2.8x faster; median - min was 0.26 ms). Another candidate replaces the default only when its
median is lower by more than the larger of the two spreads, and among those that do, the lowest median wins: a
difference inside the noise never changes the choice.

Used by `python -m export --precision auto` (ONNX Runtime, torch and, where installed, OpenVINO candidates; the
torch ones are served from the checkpoint when it is at hand, the OpenVINO ones from the export's own ONNX files,
export_reader) and, for a checkpoint served or indexed with the torch backend, by
`torch_auto_encoder` (torch precisions only: fp32, bf16 and bf16-compiled where the CPU has bf16 units, int8-text
where the extension is built). Timings can be injected (tests): the choice is a pure function of the samples.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from .candidate_timing import Sampler, TimingPool
from .cpu_features import cpu_info

TOWERS = ("vision", "text")
log = logging.getLogger(__name__)

__all__ = ["TowerCandidate", "PerTowerEncoder", "choose_tower", "choose_towers", "openvino_candidates",
           "summary_line", "torch_candidates", "torch_auto_encoder"]


@dataclass
class TowerCandidate:
    """One way to run one tower: its timed samples (seconds per call of the workload) and its parity."""

    name: str  # e.g. "onnx-int8", "torch-int8-text"
    backend: str  # "onnxruntime", "torch" or "openvino"
    precision: str
    samples: list[float] = field(default_factory=list)
    min_cosine: float | None = None
    threshold: float = 0.99
    reason: str | None = None  # why it was not timed or did not pass (None: it ran and passed)
    source: str | None = None  # the export precision whose ONNX files it runs (OpenVINO candidates)

    @property
    def passed(self) -> bool:
        return (self.reason is None and bool(self.samples) and self.min_cosine is not None
                and self.min_cosine >= self.threshold)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("inf")

    @property
    def spread(self) -> float:
        """median - min of the samples: the noise on the fast side (0 for one sample)."""
        return self.median - min(self.samples) if self.samples else float("inf")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "precision": self.precision, "passed": self.passed,
                               "min_cosine": self.min_cosine, "threshold": self.threshold}
        if self.source is not None:
            out["source"] = self.source
        if self.samples:
            out.update(samples_s=[round(s, 6) for s in self.samples], median_s=self.median, spread_s=self.spread)
        if self.reason is not None:
            out["reason"] = self.reason
        elif not self.passed and self.min_cosine is not None:
            out["reason"] = f"fails parity: min cosine {self.min_cosine:.6f} < {self.threshold}"
        return out


def choose_tower(candidates: Sequence[TowerCandidate]) -> TowerCandidate:
    """The noise rule (module docstring): the default (first passing) unless another passing candidate's median is
    lower by more than the larger spread of the two; the lowest such median wins."""
    passing = [c for c in candidates if c.passed]
    if not passing:
        raise InputError("no candidate passed parity: " + "; ".join(
            f"{c.name}: {c.as_dict().get('reason', 'not timed')}" for c in candidates))
    default = passing[0]
    winners = [c for c in passing[1:] if default.median - c.median > max(default.spread, c.spread)]
    return min(winners, key=lambda c: c.median) if winners else default


def choose_towers(candidates: dict[str, Sequence[TowerCandidate]]) -> dict[str, TowerCandidate]:
    """choose_tower for each tower on its own: the vision tower may run one precision and the text tower another."""
    return {tower: choose_tower(cands) for tower, cands in candidates.items()}


def summary_line(choices: dict[str, TowerCandidate], candidates: dict[str, Sequence[TowerCandidate]]) -> str:
    """One line: per tower the choice, its median and spread, and every other candidate's median (or why not)."""
    parts = []
    for tower, chosen in choices.items():
        others = []
        for c in candidates[tower]:
            if c is chosen:
                continue
            others.append(f"{c.name} {c.median * 1e3:.1f}" if c.passed else f"{c.name} -")
        parts.append(f"{tower}: {chosen.name} {chosen.median * 1e3:.1f} ms (spread {chosen.spread * 1e3:.1f}, "
                     f"parity {chosen.min_cosine:.4f}) over {', '.join(others) or 'nothing else'}")
    return f"precision auto on {cpu_info().model}: " + "; ".join(parts)


class PerTowerEncoder:
    """The Encoder protocol over two encoders: images from one, texts from the other."""

    def __init__(self, vision: Any, text: Any, names: dict[str, str] | None = None) -> None:
        if vision.embed_dim != text.embed_dim or vision.input_resolution != text.input_resolution:
            raise InputError("per-tower encoders disagree on embed_dim or input_resolution")
        self.vision, self.text = vision, text
        self.embed_dim, self.input_resolution = vision.embed_dim, vision.input_resolution
        self.names = names or {}

    @property
    def precision(self) -> str:
        """What each tower runs, e.g. "vision torch-fp32, text torch-int8-text" (for /readyz and logs)."""
        return ", ".join(f"{tower} {name}" for tower, name in self.names.items()) or "per tower"

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return self.vision.encode_images(pixels)

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        return self.text.encode_texts(token_ids)


# ---- torch precisions --------------------------------------------------------------------------------------------

def torch_precisions() -> list[tuple[str, str | None]]:
    """Each torch precision auto considers on this CPU, with why it is skipped here (None: it runs)."""
    from ..ops import extension_available

    info = cpu_info()
    bf16 = None if info.bf16 else f"this CPU ({info.model}) has no bf16 units (AMX or AVX512-BF16)"
    int8 = None if extension_available() else "engine._laclip_ext is not built"
    return [("fp32", None), ("bf16", bf16), ("bf16-compiled", bf16), ("int8-text", int8)]


def _row_min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return float((a * b).sum(1).min())


# int8-text keeps the fp32 image tower: timing it for images would time the reference again.
TEXT_ONLY = {"int8-text"}
THRESHOLDS = {"fp32": 0.99999, "bf16": 0.999, "bf16-compiled": 0.999, "int8-text": 0.99}


def fp32_parity(model: torch.nn.Module, resolution: int, pixels: torch.Tensor,
                token_ids: torch.Tensor) -> Callable[[Any], dict[str, float]]:
    """parity(encoder) -> per tower the min per-vector cosine against fp32 PyTorch on these inputs."""
    from .torch_backend import TorchEncoder

    ref = TorchEncoder(model, resolution)
    want = {"vision": ref.encode_images(pixels), "text": ref.encode_texts(token_ids)}

    def parity(encoder: Any) -> dict[str, float]:
        return {"vision": _row_min_cosine(encoder.encode_images(pixels), want["vision"]),
                "text": _row_min_cosine(encoder.encode_texts(token_ids), want["text"])}
    return parity


def torch_candidates(model: torch.nn.Module, resolution: int, parity: Callable[[Any], dict[str, float]],
                     pool: TimingPool, precisions: Iterable[str] | None = None,
                     thresholds: dict[str, float] | None = None) -> tuple[dict[str, list[TowerCandidate]], dict[str, Any]]:
    """Gate the torch precisions this CPU runs (those in `precisions`, default all) and queue them in `pool` (their
    samples are filled when it is flushed): per tower the candidates in preference order, and the encoders built
    (precision -> TorchEncoder). `parity(encoder)` gives each tower's min cosine against the fp32 truth
    (fp32_parity, or the export's own gate). Skipped precisions are listed with the reason."""
    from .torch_backend import TorchEncoder

    thresholds = {**THRESHOLDS, **(thresholds or {})}
    wanted = None if precisions is None else set(precisions)
    out: dict[str, list[TowerCandidate]] = {t: [] for t in TOWERS}
    encoders: dict[str, Any] = {}
    for precision, skip in torch_precisions():
        if wanted is not None and precision not in wanted:
            continue
        name = f"torch-{precision}"
        towers = ("text",) if precision in TEXT_ONLY else TOWERS
        cands = {t: TowerCandidate(name, "torch", precision, threshold=thresholds[precision], reason=skip)
                 for t in towers}
        if skip is None:
            encoder = TorchEncoder(model, resolution, precision=precision)
            encoders[precision] = encoder
            gate_and_queue(cands, encoder, parity, pool)
        for tower, cand in cands.items():
            out[tower].append(cand)
    return out, encoders


def gate_and_queue(cands: dict[str, TowerCandidate], encoder: Any, parity: Callable[[Any], dict[str, float]],
                   pool: TimingPool) -> None:
    """Each tower's parity from `encoder` (the call is also the warm-up: bf16-compiled compiles its buckets
    there), then the candidates queued in `pool` to be timed with the others."""
    cosines = parity(encoder)
    for tower, cand in cands.items():
        cand.min_cosine = cosines[tower]
    pool.add(cands, encoder)


def openvino_candidates(files: dict[str, tuple[Path, Path]], dims: dict[str, int],
                        parity: Callable[[Any], dict[str, float]], thresholds: dict[str, float],
                        pool: TimingPool) -> dict[str, list[TowerCandidate]]:
    """Gate OpenVINO on the export's own ONNX files (`files`: export precision -> (vision, text) paths of the
    precisions that passed parity; `dims`: embed_dim, input_resolution, pad_id) and queue it in `pool`, per
    tower in the order of openvino_backend.CANDIDATES, each held to `thresholds[name]`. A candidate that cannot
    run here (OpenVINO absent, no bf16 units, its source precision failed parity, an operator OpenVINO cannot
    compile) is listed with the reason."""
    from .openvino_backend import CANDIDATES, GATE_PRECISION, candidate_encoder

    out: dict[str, list[TowerCandidate]] = {t: [] for t in TOWERS}
    for name, (source, _) in CANDIDATES.items():
        cands = {t: TowerCandidate(name, "openvino", GATE_PRECISION[name], threshold=thresholds[name],
                                   source=source) for t in TOWERS}
        encoder, reason = None, f"the export's {source} towers failed their parity gate"
        if source in files:
            encoder, reason = candidate_encoder(name, *files[source], dims)
        if encoder is not None:
            gate_and_queue(cands, encoder, parity, pool)
        for tower, cand in cands.items():
            cand.reason = reason
            out[tower].append(cand)
    return out


def torch_auto_encoder(model: torch.nn.Module, resolution: int, repeats: int = 5, context_length: int = 52,
                       sampler: Sampler | None = None) -> tuple[Any, dict[str, Any]]:
    """For a checkpoint served or indexed with the torch backend and `--precision auto`: time the torch precisions
    this CPU runs on a batch of 8 generated images and one query of 8 tokens, choose per tower by the noise rule,
    and return (encoder, report). The report holds each candidate's samples and parity, the choices and
    `summary` (one line, also logged)."""
    from ..preprocess import Tokenizer

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, resolution, resolution, generator=gen)
    texts = ["".join(chr(0x4E00 + int(c)) for c in torch.randint(0, 20000, (6,), generator=gen)) for _ in range(4)]
    ids = Tokenizer(context_length)(texts).ids
    parity = fp32_parity(model, resolution, pixels, ids)
    pool = TimingPool(pixels, ids[:1], repeats, sampler)
    candidates, encoders = torch_candidates(model, resolution, parity, pool)
    pool.flush()
    choices = choose_towers(candidates)
    summary = summary_line(choices, candidates)
    log.info("%s", summary)
    vision, text = (encoders[choices[t].precision] for t in TOWERS)
    names = {t: choices[t].name for t in TOWERS}
    encoder = vision if vision is text else PerTowerEncoder(vision, text, names)
    report = {"machine": cpu_info().as_dict(), "threads": torch.get_num_threads(),
              "workload": {"vision": f"{len(pixels)} images", "text": "1 query of 8 tokens"},
              "rule": "default first passing; another wins only if its median is lower by more than the larger "
                      "spread (median - min of the rounds); candidates timed together in rotating rounds",
              "chosen": names, "summary": summary,
              "towers": {t: {c.name: c.as_dict() for c in candidates[t]} for t in TOWERS}}
    return encoder, report
