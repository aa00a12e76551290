"""Response models: what each route answers, for OpenAPI (the routes build the same shapes as dicts)."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, Field

from .bodies import IdValue


class CropEvidence(BaseModel):
    """One LACLIP crop of a hit: its box in the original image's pixels (null when the size was not recorded),
    its similarity to the query and its weight under the scoring used."""

    box: Optional[list[int]]
    similarity: float
    weight: float


class Evidence(BaseModel):
    """Why an image hit scored (asked for with "explain"): its K crops (weights sum to 1) and `best`, the crop
    with the largest weight x similarity (for against="crops": the crop that matched)."""

    image_size: Optional[list[int]]
    best: int
    crops: list[CropEvidence]
    note: Optional[str] = None


class HitOut(BaseModel):
    """One search result: the item's id, its score (higher is better), its payload (texts carry `text`,
    images their `source` file name and any metadata given when added) and, with "explain" on a LACLIP index,
    its crop evidence."""

    id: IdValue
    score: float
    payload: Optional[dict[str, Any]] = None
    evidence: Optional[Evidence] = None


class ImageSearchResponse(BaseModel):
    """Hits for the query (a list of hit lists for a list of queries); `truncated` tells whether the tokenizer
    cut a query."""

    hits: Union[list[HitOut], list[list[HitOut]]]
    truncated: Union[bool, list[bool]]


class HitsResponse(BaseModel):
    hits: list[HitOut]


class EncodeTextResponse(BaseModel):
    embeddings: list[list[float]]
    truncated: list[bool]
    dim: int


class EncodeImageResponse(BaseModel):
    embedding: list[float]
    crops: Optional[list[list[float]]] = Field(None, description="LACLIP crop embeddings when the index has them")
    dim: int


class IndexResponse(BaseModel):
    """After an add: the ids added, the index's counts, and whether the add is on disk (durable)."""

    added: list[IdValue]
    images: int
    texts: int
    persisted: bool


class DeleteResponse(BaseModel):
    """After a delete: how many rows were deleted, the index's counts, whether the change is on disk."""

    deleted: int
    images: int
    texts: int
    persisted: bool


class InfoResponse(BaseModel):
    """What the page needs to know before the first search (no key needed)."""

    auth: bool
    model: str
    backend: str
    precision: str
    device: str
    random_weights: bool = Field(False, description="the model has random weights: rankings mean nothing")
    laclip: Optional[dict[str, Any]]
    max_k: int
    images: int
    texts: int


class ReadyResponse(BaseModel):
    status: str
    model: str
    backend: str
    precision: str
    device: str
    images: int
    texts: int


class HealthResponse(BaseModel):
    status: str


class DuplicateGroupOut(BaseModel):
    size: int
    members: list[IdValue]


class DuplicatesResponse(BaseModel):
    """Groups of near-duplicate images (largest first, at most `limit`) among `images` live images."""

    threshold: float
    groups: list[DuplicateGroupOut]
    images: int


class PayloadKeyOut(BaseModel):
    key: str
    types: list[str]
    examples: list[Any]


class PayloadKeysResponse(BaseModel):
    """Payload keys seen in the first 10,000 live rows, most frequent first, with their JSON types and up to 5
    example values."""

    keys: list[PayloadKeyOut]
