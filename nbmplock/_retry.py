"""Whether an item that failed runs again: attempts counted per item."""

from __future__ import annotations


class RetryPolicy:
    """``max_retries`` more attempts per item, in this run (manager thread only)."""

    def __init__(self, max_retries: int):
        self.max_retries = max_retries
        self._attempts: dict = {}

    def failed(self, key) -> int:
        """Count a failed attempt of ``key``; returns its attempts so far in this run."""
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        return attempts

    def again(self, attempts: int) -> bool:
        """Is an item that failed ``attempts`` times worth another attempt?"""
        return attempts <= self.max_retries
