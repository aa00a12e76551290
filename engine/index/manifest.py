"""What an index was made with (its identity), how it stores vectors, and its ANN settings."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ..errors import IndexFormatError, InputError
from ..laclip import CropConfig, LaclipConfig, ScoreConfig
from ..preprocess import TEXT_PIPELINE

# Format 2 differs from 3 only in what IVF's search settings meant (every row of the probed lists was scored
# exactly, and nprobe/refine were tuned for that): a format-2 commit opens as format 3 with the current
# defaults in their place, and its IVF segments are scanned exactly until compaction rebuilds them.
FORMAT_VERSION = 3
STORAGE_DTYPES = ("float32", "float16")
AnnKind = Literal["ivf", "hnsw", "none"]


@dataclass(frozen=True)
class AnnConfig:
    """Approximate candidate search (FAISS). Build settings apply when a segment is written; the rest per search.

    kind: "ivf" (spherical k-means lists with 4-bit fast-scan PQ codes, one per `pq_dims` dimensions), "hnsw" (a
    graph) or "none". Either kind yields `k x refine` candidates per query, which are re-scored exactly. IVF probes `nprobe` lists of a
    segment, by default a quarter of them (at least 16): the fraction, not the count, keeps recall as lists
    grow with sqrt(rows). Segments under `min_rows` rows get no ANN and are scanned exactly, and a whole index
    under `exact_below` live rows is always searched exactly.
    """

    kind: AnnKind = "ivf"
    min_rows: int = 20_000
    exact_below: int = 50_000
    nlist: int | None = None
    nprobe: int | None = None
    pq_dims: int = 2
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    refine: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("ivf", "hnsw", "none"):
            raise InputError(f"ann kind must be 'ivf', 'hnsw' or 'none', got {self.kind!r}")
        for name in ("min_rows", "exact_below", "pq_dims", "hnsw_m", "ef_construction", "ef_search", "refine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "exact_below" else 1):
                raise InputError(f"ann {name} must be a positive int, got {value!r}")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"ann {name} must be a positive int or None, got {value!r}")

    def lists_for(self, rows: int) -> int:
        """IVF list count for a segment of `rows` rows: `nlist`, or about 4 sqrt(rows); at least 40 rows a list
        (what k-means asks for per centroid)."""
        return max(1, min(rows // 40, self.nlist or int(round(4 * rows ** 0.5))))

    def probes_for(self, lists: int) -> int:
        """IVF lists probed in a segment of `lists` lists: `nprobe`, or an eighth of them (at least 16)."""
        return max(1, min(lists, self.nprobe or max(16, lists // 8)))


@dataclass
class IndexManifest:
    """Identity (model, checkpoint, embedding size, context length, crop settings, storage dtype, text pipeline)
    plus the default scoring and ANN settings. Opening an index checks the identity against the model in use."""

    model: str
    checkpoint_hash: str
    embed_dim: int
    laclip: LaclipConfig | None
    checkpoint_path: str | None = None
    context_length: int = 52
    export_dir: str | None = None
    dtype: str = "float32"
    text_pipeline: str | None = TEXT_PIPELINE
    ann: AnnConfig = field(default_factory=AnnConfig)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise InputError(f"storage dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    @property
    def crops(self) -> CropConfig | None:
        return self.laclip.crops if self.laclip else None

    @property
    def score(self) -> ScoreConfig | None:
        return self.laclip.score if self.laclip else None

    @property
    def num_crops(self) -> int:
        return self.laclip.num_crops if self.laclip else 0

    def identity(self) -> str:
        """A digest of everything stored rows depend on: segments written for one identity fit only that index."""
        crops = self.crops.to_dict() if self.crops else None
        key = [self.model, self.checkpoint_hash, self.embed_dim, self.context_length, crops, self.dtype]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def with_laclip(self, laclip: LaclipConfig | None) -> "IndexManifest":
        return replace(self, laclip=laclip)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "model": self.model, "checkpoint_hash": self.checkpoint_hash,
            "checkpoint_path": self.checkpoint_path, "export_dir": self.export_dir, "embed_dim": self.embed_dim,
            "context_length": self.context_length, "dtype": self.dtype, "text_pipeline": self.text_pipeline,
            "crops": self.crops.to_dict() if self.crops else None,
            "score": self.score.to_dict() if self.score else None, "ann": asdict(self.ann),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest") -> "IndexManifest":
        try:
            crops = CropConfig.from_dict(data["crops"]) if data.get("crops") else None
            score = ScoreConfig.from_dict(data["score"]) if data.get("score") else None
            laclip = LaclipConfig.from_parts(crops, score) if crops else None
            version = int(data["format_version"])
            ann = dict(data.get("ann", {}))
            if version == 2:
                ann = {key: value for key, value in ann.items() if key not in ("nprobe", "refine")}
                version = FORMAT_VERSION
            return cls(data["model"], data["checkpoint_hash"], int(data["embed_dim"]), laclip,
                       data.get("checkpoint_path"), int(data["context_length"]), data.get("export_dir"),
                       data["dtype"], data.get("text_pipeline"), AnnConfig(**ann), version)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{source}: damaged manifest ({exc.__class__.__name__}: {exc})") from exc


MISMATCH_ADVICE = {
    "model": "open it with the model it records (python -m engine.serve --index DIR takes it from the index when "
             "--model is left out), or build a new index for this model in another directory",
    "checkpoint hash": "its vectors were made with other weights and cannot be mixed with these: serve it with the "
                       "checkpoint it was built with{recorded}, or index your collection again with these weights "
                       "into another directory (a new --index)",
}


def identity_mismatch(source: str, what: str, stored: Any, mine: Any,
                      checkpoint_path: str | None = None) -> IndexFormatError:
    """The error for opening the index at `source` with another model, checkpoint or encoding setting than it
    was built with: both values, and what to do about it."""
    advice = MISMATCH_ADVICE.get(what, "open it with the settings it records (leave the option out), or build a "
                                       "new index with these settings in another directory")
    recorded = f" ({checkpoint_path}: leave out --checkpoint)" if checkpoint_path else ""
    return IndexFormatError(f"index {source} was built with {what} {stored!r}, but this retriever has {mine!r}: "
                            + advice.format(recorded=recorded))
