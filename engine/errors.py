"""Exception types the engine raises: each names the input or file at fault."""
from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InputError(EngineError, ValueError):
    """A caller-supplied value (text, id, k, shape) is invalid."""


class ImageDecodeError(InputError):
    """An image could not be decoded: corrupt, truncated, empty, not an image, or too many pixels."""


class CheckpointError(EngineError):
    """A checkpoint file is missing, unreadable, or does not match the model structure."""


class IndexFormatError(EngineError):
    """An index directory is missing, damaged, or was made with another model or checkpoint."""


class IdConflictError(InputError):
    """Another process's commit, made while this write waited, added an id this write adds, or deleted a row this
    write deletes (HTTP 409); the write changed nothing."""


class ReadOnlyIndexError(EngineError):
    """A write to an index opened read-only (a replica: `python -m engine.serve --read-only`; HTTP 403)."""


class IndexBusyError(EngineError):
    """The index's writer lock stayed held by another writer past the lock timeout (HTTP 503, retry)."""


class ShardUnavailableError(EngineError):
    """A search could not reach every shard of a Ray Serve deployment (replicas down or restarting, a timeout, or
    the index changed meanwhile); nothing partial was returned (HTTP 503, retry)."""
