"""Index a large image collection on many workers with Ray Data, or in one process with the same code.

`index_collection(IndexJob(...))` is what `python -m engine index` runs; see engine.distributed.job.
"""
from .job import IndexJob, IndexReport, index_collection
from .runners import RayOptions
from .watchdog import IndexingStalled

__all__ = ["IndexJob", "IndexReport", "IndexingStalled", "RayOptions", "index_collection"]
