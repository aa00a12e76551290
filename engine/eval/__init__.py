"""Retrieval evaluation: cn_clip-format and image-folder datasets, Recall@1/5/10 and MR, global vs LACLIP."""
from ..dataset_features import FeatureCache
from ..datasets import Dataset, DatasetError, Problem, read_dataset
from ..recall import best_ranks, recalls, retrieval_metrics
from .evaluate import EvalReport, EvalSettings, evaluate

__all__ = [
    "Dataset", "DatasetError", "EvalReport", "EvalSettings", "FeatureCache", "Problem", "best_ranks",
    "evaluate", "read_dataset", "recalls", "retrieval_metrics",
]
