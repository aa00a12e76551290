"""The one payload rule, for the Retriever, the server, the CLI and Ray jobs alike.

An image's payload is the caller's dict over {"source": its file name} (for an input that has one: a path, an
upload with a file name, a collection's file or member), and None when there is neither. A text's payload is the
caller's dict with "text" set to the indexed text: the text wins over a caller's own "text" key.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import InputError

Payload = dict[str, Any] | None


def check_payloads(payloads: Sequence[dict | None] | None, n: int) -> list[dict | None]:
    """The caller's payloads: None, or a list of n dicts (or None)."""
    if payloads is None:
        return [None] * n
    if isinstance(payloads, (dict, str, bytes)) or not hasattr(payloads, "__len__") or len(payloads) != n:
        raise InputError(f"payloads must be a list of {n} dicts (or None), one per item")
    for position, payload in enumerate(payloads):
        if payload is not None and not isinstance(payload, dict):
            raise InputError(f"payload #{position} must be a dict, got {type(payload).__name__}")
    return list(payloads)


def image_payloads(names: Sequence[str | None], payloads: Sequence[dict | None] | None) -> list[Payload]:
    """Each image's payload: the caller's keys over {"source": file name}; None when there is neither."""
    given = check_payloads(payloads, len(names))
    return [{**({"source": name} if name else {}), **(extra or {})} or None for name, extra in zip(names, given)]


def text_payloads(texts: Sequence[str], payloads: Sequence[dict | None] | None) -> list[Payload]:
    """Each text's payload: the caller's keys, with "text" set to the indexed text."""
    given = check_payloads(payloads, len(texts))
    return [{**(extra or {}), "text": text} for text, extra in zip(texts, given)]
