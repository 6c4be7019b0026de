"""Reading an arm over a flaky serial line: retries inside the tick, and a fault when it lasts.

Real Feetech boards drop a status packet now and then ("There is no status packet!", "Incorrect
status packet!"); LeRobot raises on the first one. `DeviceReader` retries a failed read while
the tick still has time for another attempt as long as the last one took, so a corrupt reply (fast
to fail) is repaired within the tick, while a timed-out one (LeRobot waits ~50 ms) is not
retried into the next tick. When no read has worked for `fault_after_s` the device is in fault
until one works again; the caller holds the arm and says so. This module must never send the
device anything: it only reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from services import metrics

log = logging.getLogger(__name__)
DEVICE_STATES = ("ok", "retrying", "fault")  # retrying: reads fail, not yet for fault_after_s


class DeviceReader:
    def __init__(
        self,
        read: Callable[[], Mapping[str, Any]],
        keys: tuple[str, ...],
        fault_after_s: float,
        what: str,
        max_attempts: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(fault_after_s) and fault_after_s > 0):
            raise ValueError(f"fault_after_s must be positive and finite, got {fault_after_s}")
        self._read = read
        self.keys = keys
        self.fault_after_s = fault_after_s
        self.what = what  # "leader" or "follower", for log lines
        self.max_attempts = max_attempts
        self._clock = clock
        self.state = "ok"
        self.errors = 0  # failed attempts
        self.retries = 0  # attempts made again within the same tick
        self.failed_reads = 0  # ticks that ended with no reading
        self.faults = 0  # times the device went into fault
        self._last_ok_s = clock()
        self._burst = 0  # failed attempts since the last good read
        metrics.DEVICE_FAULT.set(0)

    def read(self, budget_s: float) -> tuple[float, ...] | None:
        """The joints in key order, or None when every attempt within budget_s failed."""
        start = self._clock()
        for attempt in range(self.max_attempts):
            began = self._clock()
            try:
                values = self._read()
                position = tuple(float(values[key]) for key in self.keys)
                if not all(math.isfinite(value) for value in position):
                    raise ValueError(f"non-finite reading {position}")
            except Exception as exc:  # a serial hiccup must never end the control loop
                self._failed(exc)
                now = self._clock()
                if now + (now - began) > start + budget_s or attempt + 1 == self.max_attempts:
                    break
                self.retries += 1
                metrics.DEVICE_READ_RETRIES.inc()
                continue
            self._succeeded()
            return position
        self._tick_failed()
        return None

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._burst += 1
        metrics.DEVICE_ERRORS.labels(op="read").inc()
        if self._burst == 1 or self._burst % 100 == 0:  # once per burst, then every 100
            log.warning("%s: device read failed (%d in a row): %s", self.what, self._burst, exc)

    def _succeeded(self) -> None:
        if self.state == "fault":
            metrics.DEVICE_FAULT.set(0)
            log.warning("%s: device readable again after %d failed reads; fault cleared",
                        self.what, self._burst)  # fmt: skip
        elif self._burst:
            log.info("%s: device read recovered after %d failed attempts", self.what, self._burst)
        self.state = "ok"
        self._burst = 0
        self._last_ok_s = self._clock()

    def _tick_failed(self) -> None:
        self.failed_reads += 1
        silent_s = self._clock() - self._last_ok_s
        if self.state != "fault" and silent_s >= self.fault_after_s:
            self.state = "fault"
            self.faults += 1
            metrics.DEVICE_FAULT.set(1)
            log.error("%s: no good read of the arm for %.0f ms: device FAULT, holding",
                      self.what, silent_s * 1000)  # fmt: skip
        elif self.state == "ok":
            self.state = "retrying"
