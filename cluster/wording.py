"""Words in messages people read: counts with the right plural."""

from __future__ import annotations

from typing import Optional


def plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """'1 request', '2 requests', '0 requests'; `nouns` for irregular plurals."""
    word = noun if count == 1 else nouns or noun + "s"
    return f"{count:g} {word}" if isinstance(count, float) else f"{count} {word}"
