"""Chinese-CLIP retrieval engine: cn_clip towers, exact preprocessing, LACLIP scoring, index and search."""
from .errors import CheckpointError, EngineError, ImageDecodeError, IndexFormatError, InputError
from .laclip import CropConfig, LaclipConfig, ScoreConfig
from .models import available_models
from .retriever import Hit, Retriever

__all__ = [
    "CheckpointError", "CropConfig", "EngineError", "Hit", "ImageDecodeError", "IndexFormatError", "InputError",
    "LaclipConfig", "Retriever", "ScoreConfig", "available_models",
]
