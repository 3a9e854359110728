"""Exponential backoff with jitter for a whole destination, kept across restarts."""

from __future__ import annotations

import random
from dataclasses import dataclass


def delay(step: int, *, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number *step* + 1 (step counts from 1).

    Full exponential growth capped at *maximum*, then "equal jitter": a random point in
    the upper half, so many senders that failed together do not return together.
    """
    r: random.Random = rng or random.Random()
    raw = min(maximum, base * (2.0 ** min(max(0, step - 1), 64)))
    return float(raw * r.uniform(0.5, 1.0))


@dataclass
class DestinationBackoff:
    """The state of one destination: healthy, or failing since some step."""

    base: float
    maximum: float
    step: int = 0
    until: float = 0.0
    last_error: str = ""
    since: float = 0.0  # when the first failure of this run of failures was

    def failed(self, now: float, error: str) -> float:
        if self.step == 0 or not self.since:
            self.since = now
        self.step += 1
        wait = delay(self.step, base=self.base, maximum=self.maximum)
        self.until = now + wait
        self.last_error = error
        return wait

    def succeeded(self) -> bool:
        """Reset; True if we were backing off (so the caller can log the recovery)."""
        was = self.step > 0
        self.step, self.until, self.last_error, self.since = 0, 0.0, "", 0.0
        return was

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)

    def to_state(self) -> dict[str, object]:
        return {"step": self.step, "until": self.until, "last_error": self.last_error,
                "since": self.since}

    def load_state(self, state: dict[str, object]) -> None:
        try:
            self.step = int(state.get("step", 0))  # type: ignore[call-overload]
            self.until = float(state.get("until", 0.0))  # type: ignore[arg-type]
            self.last_error = str(state.get("last_error", ""))
            self.since = float(state.get("since", 0.0))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.step, self.until, self.last_error, self.since = 0, 0.0, "", 0.0
