"""The one way every benchmark summarises its samples: nearest-rank percentiles in milliseconds.

A percentile is only reported when there are enough samples for it to mean something: p95 needs
at least 20 samples (the 95th is then the 19th of 20, not the maximum), p99 at least 100. With
fewer, the field is null and `max_ms` says what there is to say.
"""

from __future__ import annotations

import math
import statistics

MIN_SAMPLES = {50: 1, 95: 20, 99: 100}


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100] of a non-empty list: the smallest sample with at
    least q % of the samples at or below it."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary_ms(samples_ms: list[float], digits: int = 3) -> dict[str, float | int | None]:
    """n, p50/p95/p99 (null below their minimum sample counts), mean, min and max, in ms."""
    if not samples_ms:
        return {"n": 0}
    n = len(samples_ms)
    out: dict[str, float | int | None] = {"n": n}
    for q, need in MIN_SAMPLES.items():
        out[f"p{q}_ms"] = round(percentile(samples_ms, q), digits) if n >= need else None
    out["mean_ms"] = round(statistics.fmean(samples_ms), digits)
    out["min_ms"] = round(min(samples_ms), digits)
    out["max_ms"] = round(max(samples_ms), digits)
    return out


def summary_s(samples_s: list[float], digits: int = 3) -> dict[str, float | int | None]:
    """summary_ms of samples taken in seconds."""
    return summary_ms([s * 1000.0 for s in samples_s], digits)
