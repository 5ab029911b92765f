"""Short, safe text for messages: an item can be a megabyte, or hold a lone surrogate."""

from __future__ import annotations

import reprlib

_repr = reprlib.Repr()
_repr.maxstring = 10_000  # strings are cut by clip(), keeping both ends
_repr.maxother = 10_000


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping its start and its end."""
    if len(text) <= limit:
        return text
    head = max(1, (limit - 1) * 2 // 3)
    tail = max(0, limit - 1 - head)
    return text[:head] + "…" + (text[-tail:] if tail else "")


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` of at most ``limit`` characters (never the whole of a huge item)."""
    if isinstance(value, str) and len(value) > 4 * limit:
        value = value[:2 * limit] + value[-limit:]  # repr of the parts we may show
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break a message
        text = f"<{type(value).__name__} object>"
    return clip(text, limit)
