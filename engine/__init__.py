"""Chinese-CLIP retrieval engine: cn_clip towers, exact preprocessing, LACLIP scoring, index and search."""
from .errors import CheckpointError, EngineError, ImageDecodeError, IndexFormatError, InputError
from .laclip import LaclipConfig
from .models import available_models
from .retriever import Hit, Retriever

__all__ = [
    "CheckpointError", "EngineError", "Hit", "ImageDecodeError", "IndexFormatError", "InputError",
    "LaclipConfig", "Retriever", "available_models",
]
