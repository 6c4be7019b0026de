"""The station's wall clock: origin times of frames and the times they are judged against.

Every frame time (`t`) and every age check in a station reads this one clock, so that a test can
give one station a skewed clock (RDV_CLOCK_SKEW_MS) and prove that the gateway's offset estimate
corrects it. The skew is a testing aid for a single process tree; it must never be set on a
station that moves a real arm.
"""

from __future__ import annotations

import os
import time

SKEW_ENV = "RDV_CLOCK_SKEW_MS"


def _skew_ns() -> int:
    raw = os.environ.get(SKEW_ENV, "").strip()
    if not raw:
        return 0
    try:
        return int(float(raw) * 1_000_000)
    except ValueError:
        raise SystemExit(f"{SKEW_ENV}={raw!r} is not a number of milliseconds") from None


SKEW_NS = _skew_ns()


def now_ns() -> int:
    """Wall-clock time in ns, as this station sees it (skewed when RDV_CLOCK_SKEW_MS is set)."""
    return time.time_ns() + SKEW_NS
