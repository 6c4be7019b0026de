"""Periodic `health` frames: each process says, about once a second, that it lives and how.

Sending is cheap and never blocks; a process calls `maybe_send` from its own loop so health
stops exactly when the loop stops, which is the point.
"""

from __future__ import annotations

import time
from typing import Any

from services import clock
from services.bus.frames import MessageFrame
from services.bus.pubsub import Publisher


class HealthBeat:
    def __init__(self, publisher: Publisher, station: str, process: str, period_s: float = 1.0):
        self._publisher = publisher
        self._station = station
        self._process = process
        self._period_s = period_s
        self._next = 0.0

    def maybe_send(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._period_s
        frame = MessageFrame(
            self._publisher.next_seq(),
            clock.now_ns(),
            self._station,
            {"process": self._process, **fields},
        )
        self._publisher.send("health", frame)
