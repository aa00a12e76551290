"""Fine-tuning Chinese-CLIP on a user's image-text pairs: CE-CLIP's two stages, InfoNCE with gathered negatives,
gradient caching, torchrun, resumable runs; the output is a cn_clip checkpoint the rest of the engine loads."""
from .config import FinetuneConfig
from .train import FinetuneResult, TrainingError, finetune, resume

__all__ = ["FinetuneConfig", "FinetuneResult", "TrainingError", "finetune", "resume"]
