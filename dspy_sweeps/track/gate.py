"""Scores with their uncertainty: bootstrap intervals over per-example scores.

The promotion gate scores challenger and champion on the same test examples and resamples
those examples (a paired bootstrap): the challenger is promoted only when the whole interval
of its gain lies above `min_gain`. The leaderboard shows a validation score's interval the
same way. Per-example scores are lists aligned with a split's rows; `None` marks an example
that could not be scored (its LM call failed), left out of every comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RESAMPLES = 10_000
SEED = 0  # fixed, so a decision (and the interval shown for it) is the same every time it is computed


@dataclass(frozen=True)
class Interval:
    """A mean (of scores, or of paired score differences) and its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float
    n: int  # examples it rests on

    def signed(self) -> str:
        """`+0.040 [-0.010, +0.090]`: a gain with its interval."""
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def plain(self) -> str:
        """`0.620 [0.530, 0.710]`: a score with its interval."""
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def paired_gain(
    challenger: Sequence[float | None], champion: Sequence[float | None], confidence: float
) -> Interval | None:
    """The challenger's mean gain over the champion on the examples both scored, with its interval.

    None when the lists do not describe the same examples (different lengths) or share none."""
    if len(challenger) != len(champion):
        return None
    pairs = [(c, h) for c, h in zip(challenger, champion, strict=True) if c is not None and h is not None]
    if not pairs:
        return None
    return mean_interval([c - h for c, h in pairs], confidence)


def mean_interval(values: Sequence[float | None], confidence: float) -> Interval | None:
    """The mean of the scored values and its percentile bootstrap interval; None if none were scored."""
    import numpy as np

    scored = np.asarray([v for v in values if v is not None], dtype=float)
    if scored.size == 0:
        return None
    rng = np.random.default_rng(SEED)
    means = scored[rng.integers(0, scored.size, size=(RESAMPLES, scored.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(scored.mean()), float(low), float(high), confidence, int(scored.size))
