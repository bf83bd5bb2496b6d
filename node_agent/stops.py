"""Stop sequences matched on decoded text, with the possible start of a match held back."""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and whether a stop matched."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self._stops:
            return delta, False
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
