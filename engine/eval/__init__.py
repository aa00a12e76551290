"""Retrieval evaluation: cn_clip-format and image-folder datasets, Recall@1/5/10 and MR, global vs LACLIP."""
from .datasets import Dataset, DatasetError, Problem, read_dataset
from .evaluate import EvalReport, EvalSettings, evaluate
from .features import FeatureCache
from .metrics import best_ranks, recalls, retrieval_metrics

__all__ = [
    "Dataset", "DatasetError", "EvalReport", "EvalSettings", "FeatureCache", "Problem", "best_ranks",
    "evaluate", "read_dataset", "recalls", "retrieval_metrics",
]
