"""Follower role: apply `joints.command` under every safety rule, publish `joints.follower`.

Commands are applied as soon as they arrive (latency is a feature); the fixed-rate tick checks
the deadman, reads the arm (retrying a failed read within the tick) and publishes its state.
When the arm has not been readable for --fault-after the follower holds its last goal in state
"fault", refusing commands, until a read works; then only a fresh command re-engages it, with a
ramp. An emergency stop (`session.control`
event "estop", from `rdv estop`, a viewer page or the paired teleop) latches at once and is
written to the run dir, so it survives restarts of every process including this one; only a
"rearm" event, which nothing but the robot station's own `rdv rearm` or page sends, clears it.
Every goal sent to the device comes from `FollowerSafety`: this module must never send the
device a position it did not approve.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from services import clock, metrics
from services.arm_driver.config import DriverConfig
from services.arm_driver.device_io import DeviceReader
from services.arm_driver.devices import DeviceError, joint_keys, joint_limits, set_torque
from services.arm_driver.safety import REJECT_REASONS, FollowerSafety, Step
from services.arm_driver.ticker import Ticker
from services.bus import BusMap, FollowerFrame, FrameError, MessageFrame, Publisher, Subscriber
from services.bus.health import HealthBeat

log = logging.getLogger(__name__)
STATES = ("waiting", "ramping", "tracking", "stale", "estop", "fault")
ESTOP_FILE = "estop.latched"  # in the station's run dir: a stop outlives every process


class FollowerLoop:
    def __init__(self, config: DriverConfig, device: Any, bus: BusMap) -> None:
        self.config = config
        self.device = device
        self.keys = joint_keys(device)
        self.safety_config = config.safety_config(
            joint_limits(device, self.keys, config.joint_limits)
        )
        self.reader = DeviceReader(
            device.get_observation, self.keys, config.fault_after_s, "follower"
        )
        # The first reading may retry for a whole tick; without one there is nothing to hold.
        start = self.reader.read(1.0 / config.rate_hz)
        if start is None:
            raise DeviceError("follower: cannot read the arm's position at start")
        self.measured = start
        self.safety = FollowerSafety(self.safety_config, self.measured)
        self.subscriber = Subscriber(
            bus,
            ["joints.command", "session.control"],
            joint_count=len(self.keys),
            on_drop=self._on_invalid,
        )
        self.estop_file = bus.run_dir / ESTOP_FILE
        if self.estop_file.exists():
            self.safety.latch_estop()
            log.warning("follower: emergency stop still latched (%s); `rdv rearm` clears it",
                        self.estop_file)  # fmt: skip
        metrics.ESTOP_LATCHED.set(1 if self.estop_file.exists() else 0)
        self.publisher = Publisher(bus, config.process)
        self.health = HealthBeat(self.publisher, config.station, config.process)
        self.ticker = Ticker(config.rate_hz)
        self.torque_on = True
        self.sent_goal: tuple[float, ...] | None = None
        self.device_errors = 0
        self._set_state_gauge("waiting")
        # Every reason exported at 0 from the start: a series born at 1 hides its first refusal
        # from rate()/increase(), so a dashboard would show nothing for a real rejection.
        for reason in REJECT_REASONS:
            metrics.COMMANDS_REJECTED.labels(reason=reason)

    def run(self, stop: threading.Event) -> None:
        log.info(
            "follower: %d joints, command timeout %.0f ms, max step %g per tick at %g Hz",
            len(self.keys),
            self.safety_config.command_timeout_s * 1000,
            self.safety_config.max_step,
            self.safety_config.rate_hz,
        )
        overruns = 0
        try:
            while not stop.is_set():
                received = self.subscriber.recv(timeout_ms=self.ticker.remaining_s() * 1000)
                got_command = False
                if received is not None:
                    batch = [received, *self.subscriber.drain()]
                    now_ns = clock.now_ns()
                    for item in batch:
                        if item.topic == "session.control":
                            got_command |= self._on_control(item.frame)
                            continue
                        reason = self.safety.offer(item.frame, now_ns)
                        if reason is None:
                            got_command = True
                        else:
                            metrics.COMMANDS_REJECTED.labels(reason=reason).inc()
                tick = self.ticker.due()
                if got_command or tick:
                    self._apply(self.safety.step(self.measured, clock.now_ns()))
                if tick:
                    self._read_arm()
                    self._publish_state()
                    self.ticker.advance()
                    if self.ticker.overruns > overruns:
                        metrics.LOOP_OVERRUNS.labels(loop="follower").inc(
                            self.ticker.overruns - overruns
                        )
                        overruns = self.ticker.overruns
        finally:
            self._hold_on_exit()
            self.subscriber.close()
            self.publisher.close()

    def _on_control(self, frame: Any) -> bool:
        """Latch or clear an emergency stop; True when the arm must be stepped now."""
        event = frame.fields.get("event") if isinstance(frame, MessageFrame) else None
        if event == "estop":
            if self.estop_file.exists() and self.safety_state == "estop":
                return False  # already latched: senders repeat a stop until they see it held
            self.safety.latch_estop()
            metrics.ESTOP_LATCHED.set(1)
            log.warning("follower: EMERGENCY STOP latched (from %s, %s)", frame.src,
                        frame.fields.get("by", "unknown"))  # fmt: skip
            try:
                self.estop_file.write_text(f"{frame.src} {frame.fields.get('by', '')}\n")
            except OSError as exc:  # latched in memory all the same
                log.error("follower: cannot record the stop in %s: %s", self.estop_file, exc)
            return True
        if event == "rearm":
            self.estop_file.unlink(missing_ok=True)
            self.safety.rearm()
            metrics.ESTOP_LATCHED.set(0)
            log.warning("follower: re-armed (from %s); waiting for a fresh command", frame.src)
            return True
        return False

    def _apply(self, step: Step) -> None:
        previous_state = self.safety_state
        self.safety_state = step.state
        if step.state != previous_state:
            self._set_state_gauge(step.state)
            log.info("follower: %s -> %s", previous_state, step.state)
        if step.tripped:
            metrics.WATCHDOG_TRIPS.inc()
            log.warning(
                "follower: no fresh command for %.0f ms, holding position",
                self.safety_config.command_timeout_s * 1000,
            )
        holding = step.state in ("stale", "estop")
        if holding and self.config.torque_policy == "release":
            if self.torque_on and self._try(lambda: set_torque(self.device, False), "torque"):
                self.torque_on = False
            return
        if step.state in ("waiting", "fault"):
            # waiting: never commanded, leave the arm as connect() left it. fault: the arm cannot
            # be read; its goal registers keep the last approved goal, nothing more is sent.
            return
        if not self.torque_on and self._try(lambda: set_torque(self.device, True), "torque"):
            self.torque_on = True
        if step.goal != self.sent_goal:
            action = dict(zip(self.keys, step.goal, strict=True))
            if self._try(lambda: self.device.send_action(action), "write"):
                self.sent_goal = step.goal
                if step.applied is not None:
                    latency_s = (clock.now_ns() - step.applied.t) / 1e9
                    metrics.CONTROL_LATENCY.observe(max(0.0, latency_s))
                    self.control_ms = 0.9 * self.control_ms + 0.1 * latency_s * 1e3 if (
                        self.control_ms is not None) else latency_s * 1e3  # fmt: skip

    safety_state = "waiting"
    control_ms: float | None = None

    def _read_arm(self) -> None:
        """Read within the tick's budget; on a fault hold (apply nothing) until reads work."""
        was = self.reader.state
        measured = self.reader.read(self.ticker.budget_s())
        if measured is not None:
            self.measured = measured
        if self.reader.state == "fault" and was != "fault":
            self.safety.device_fault()
            self._apply(self.safety.step(self.measured, clock.now_ns()))
        elif was == "fault" and self.reader.state == "ok":
            self.safety.device_ok()
            self._apply(self.safety.step(self.measured, clock.now_ns()))

    def _publish_state(self) -> None:
        applied = self.safety.last_applied
        frame = FollowerFrame(
            seq=self.publisher.next_seq(),
            t=clock.now_ns(),
            src=self.config.station,
            pos=self.measured,
            goal=self.safety.goal,
            state=self.safety_state,
            cmd_seq=-1 if applied is None else applied.seq,
            cmd_t=0 if applied is None else applied.t,
        )
        self.publisher.send("joints.follower", frame)
        self.health.maybe_send(
            role="follower",
            state=self.safety_state,
            torque=self.torque_on,
            rate_hz=self.config.rate_hz,
            overruns=self.ticker.overruns,
            device=self.reader.state,
            device_errors=self.device_errors + self.reader.errors,
            read_retries=self.reader.retries,
            control_ms=self.control_ms,  # smoothed leader read -> applied, for viewer pages
        )

    def _hold_on_exit(self) -> None:
        """On a clean stop the arm holds where it is rather than finishing its last motion."""
        if self.safety_state in ("ramping", "tracking"):
            measured = self.reader.read(1.0 / self.config.rate_hz)
            if measured is None:
                return  # unreadable: the goal registers keep the last approved goal
            hold = dict(zip(self.keys, measured, strict=True))
            self._try(lambda: self.device.send_action(hold), "write")

    def _try(self, action, op: str) -> bool:
        try:
            action()
        except Exception as exc:  # a serial hiccup must not end the control loop
            self._device_error(op, exc)
            return False
        return True

    def _device_error(self, op: str, exc: Exception) -> None:
        self.device_errors += 1
        metrics.DEVICE_ERRORS.labels(op=op).inc()
        if self.device_errors == 1 or self.device_errors % 100 == 0:
            log.warning("follower: device %s failed (%d so far): %s", op, self.device_errors, exc)

    def _on_invalid(self, _topic: str, _error: FrameError) -> None:
        metrics.COMMANDS_REJECTED.labels(reason="invalid").inc()

    def _set_state_gauge(self, state: str) -> None:
        for name in STATES:
            metrics.FOLLOWER_STATE.labels(state=name).set(1 if name == state else 0)


def run_follower(config: DriverConfig, device: Any, bus: BusMap, stop: threading.Event) -> None:
    FollowerLoop(config, device, bus).run(stop)
