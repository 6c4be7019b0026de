"""Leader role: read the leader arm at a fixed rate and publish `joints.leader`.

The arm is read on every tick, never "only on change", so a frame lost downstream is repaired
by the next one. Runs on its own thread; must never publish a value the device did not give
(non-finite reads are dropped and counted).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from services import clock, metrics
from services.arm_driver.config import DriverConfig
from services.arm_driver.devices import joint_keys
from services.arm_driver.ticker import Ticker
from services.bus import BusMap, JointFrame, Publisher
from services.bus.health import HealthBeat

log = logging.getLogger(__name__)


def run_leader(config: DriverConfig, device: Any, bus: BusMap, stop: threading.Event) -> None:
    keys = joint_keys(device)
    publisher = Publisher(bus, config.process)
    health = HealthBeat(publisher, config.station, config.process)
    ticker = Ticker(config.rate_hz)
    read_errors = 0
    overruns = 0
    log.info("leader: publishing %d joints on joints.leader at %g Hz", len(keys), config.rate_hz)
    try:
        while not stop.is_set():
            ticker.sleep()
            if ticker.overruns > overruns:
                metrics.LOOP_OVERRUNS.labels(loop="leader").inc(ticker.overruns - overruns)
                overruns = ticker.overruns
            try:
                action = device.get_action()
                read_ns = clock.now_ns()
                pos = tuple(float(action[key]) for key in keys)
                if not all(math.isfinite(value) for value in pos):
                    raise ValueError(f"non-finite reading {pos}")
            except Exception as exc:  # a flaky serial read must not end the loop
                read_errors += 1
                metrics.DEVICE_ERRORS.labels(op="read").inc()
                if read_errors == 1 or read_errors % 100 == 0:
                    log.warning("leader read failed (%d so far): %s", read_errors, exc)
                continue
            frame = JointFrame(publisher.next_seq(), read_ns, config.station, pos)
            publisher.send("joints.leader", frame)
            health.maybe_send(
                role="leader",
                state="reading",
                rate_hz=config.rate_hz,
                overruns=ticker.overruns,
                read_errors=read_errors,
            )
    finally:
        publisher.close()
