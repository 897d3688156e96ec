"""When the supervisor restarts a child: exponential backoff, a limit per time window, then it gives up."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """Restart `n` (counting within the last `window` seconds) waits `first * 2**n` seconds, at most `backoff_max`;
    once `limit` restarts fall within the window, `delay` says None: give up."""

    limit: int
    window: float
    backoff_max: float
    first: float = 1.0
    history: list[float] = field(default_factory=list)

    def recent(self, now: float) -> int:
        self.history = [t for t in self.history if now - t < self.window]
        return len(self.history)

    def delay(self, now: float) -> float | None:
        n = self.recent(now)
        if n >= self.limit:
            return None
        return min(self.backoff_max, self.first * 2**n)

    def record(self, now: float) -> None:
        self.history.append(now)


@dataclass
class HealthCount:
    """Failed health checks in a row; `failed()` is True once `limit` is reached."""

    limit: int
    count: int = 0

    def failed(self) -> bool:
        self.count += 1
        return self.count >= self.limit

    def passed(self) -> None:
        self.count = 0
