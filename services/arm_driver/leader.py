"""Leader role: read the leader arm at a fixed rate and publish `joints.leader`.

The arm is read on every tick, never "only on change", so a frame lost downstream is repaired
by the next one; a failed read is retried within the tick (device_io.py), and while the arm
cannot be read nothing is published, so the follower's deadman holds it. Runs on its own thread;
must never publish a value the device did not give (non-finite reads are dropped and counted).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from services import clock, metrics
from services.arm_driver.config import DriverConfig
from services.arm_driver.device_io import DeviceReader
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
    reader = DeviceReader(device.get_action, keys, config.fault_after_s, "leader")
    overruns = 0
    log.info("leader: publishing %d joints on joints.leader at %g Hz", len(keys), config.rate_hz)
    try:
        while not stop.is_set():
            ticker.sleep()
            if ticker.overruns > overruns:
                metrics.LOOP_OVERRUNS.labels(loop="leader").inc(ticker.overruns - overruns)
                overruns = ticker.overruns
            pos = reader.read(ticker.budget_s())
            if pos is not None:
                # Dated when the read returned: a retried read is as fresh as its last attempt.
                frame = JointFrame(publisher.next_seq(), clock.now_ns(), config.station, pos)
                publisher.send("joints.leader", frame)
            # Health goes out even while the arm cannot be read: that is when it matters.
            health.maybe_send(
                role="leader",
                state="reading" if reader.state != "fault" else "fault",
                device=reader.state,
                rate_hz=config.rate_hz,
                overruns=ticker.overruns,
                read_errors=reader.errors,
                read_retries=reader.retries,
            )
    finally:
        publisher.close()
