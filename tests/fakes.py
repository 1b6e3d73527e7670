"""Hand-written test doubles shared by the suites."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when told: pass ``clock=`` to adapters and services."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
