"""Fault suite on one running demo: deploy/demo.conf under real supervisord (local Mosquitto,
a robot station and a teleop station that pair over MQTT and teleoperate over WebRTC).

Every case starts from a healthy demo (all programs running, both stations live in one session,
the follower tracking the leader), breaks one thing while both buses are recorded, and asserts
what must follow: supervisord brings the program back, the session is live again, the follower
tracks again within issue 4's 10 s, no goal step ever exceeds max_step per tick, every re-engage
ramps, no command is applied out of order, and a follower that lost its commands held within
500 ms. The cases share one demo to keep the suite short; a case that leaves it unhealthy gets a
fresh one for the next. Each case adds its measured recovery to the results log
(docs/reliability.md). Processes are signalled only by the pids their supervisord reports.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.demo import (
    demo_station,
    start_demo,
    station_of_program,
)
from tests.support.faults import (
    FaultLog,
    Recovery,
    inject,
    judge,
    wait_healthy,
    wait_presence_restored,
    wait_recovered,
)
from tests.support.recorder import BusRecorder
from tests.support.station import Station

pytestmark = pytest.mark.integration
HEALTHY_WITHIN_S = 60.0
RECOVER_WITHIN_S = 10.0  # issue 4: session re-established and tracking resumed within 10 s
HOLD_WITHIN_S = 0.5  # DESIGN.md: link loss -> follower holding <= 500 ms
PAUSE_S = 3.0
BROKER_OUTAGE_S = 8.0  # longer than presence staleness (3 refresh intervals of 1 s) and more
STATION_SERVICES = {
    "robot_arm",
    "robot_session",
    "robot_gateway",
    "teleop_arm",
    "teleop_session",
    "teleop_gateway",
}


class SharedDemo:
    """One demo for the module; replaced when a case leaves it unhealthy."""

    def __init__(self) -> None:
        self.station: Station | None = None

    def healthy(self) -> Station:
        if self.station is not None:
            try:
                with recording(self.station) as recorder:
                    wait_healthy(self.station, recorder, HEALTHY_WITHIN_S)
                return self.station
            except AssertionError as exc:
                print(f"demo unhealthy, starting a fresh one: {exc}")
                self.close()
        self.station = demo_station()
        start_demo(self.station)
        return self.station

    def close(self) -> None:
        if self.station is not None:
            station, self.station = self.station, None
            station.stop()


def recording(demo: Station) -> BusRecorder:
    return BusRecorder({"robot": demo.run_dir / "robot", "teleop": demo.run_dir / "teleop"})


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedDemo]:
    holder = SharedDemo()
    try:
        yield holder
    finally:
        holder.close()


def check_recovery(recovery: Recovery, program: str) -> None:
    """What every service fault must end with (see the module docstring)."""
    assert recovery.session_after is not None, "no live session afterwards"
    assert recovery.tracking_after_resume_s is not None, "the follower is not tracking"
    assert recovery.tracking_after_resume_s <= RECOVER_WITHIN_S, recovery
    assert recovery.max_step_ratio <= 1.0, f"the goal jumped: {recovery.max_step_ratio:.2f}"
    assert recovery.ramp_ratio <= 1.0, f"re-engaged faster than a ramp: {recovery.ramp_ratio}"
    assert recovery.out_of_order == [], f"commands applied out of order: {recovery.out_of_order}"
    if recovery.hold_after_last_command_s is not None:  # the follower lost its commands
        assert recovery.hold_after_last_command_s <= HOLD_WITHIN_S, recovery


def test_sigkill_each_station_service_in_turn(
    shared: SharedDemo, fault_log: FaultLog, subtests: pytest.Subtests, request
) -> None:
    """Every program of both stations, as the running supervisord lists them (a service added
    to demo.conf, such as the camera, is covered without editing this test)."""
    programs = sorted(p for p in shared.healthy().programs() if station_of_program(p))
    assert set(programs) >= STATION_SERVICES, programs
    for program in programs:
        with (
            subtests.test(program=program),
            fault_log.case("SIGKILL", program, request.node.nodeid) as row,
        ):
            demo = shared.healthy()
            with recording(demo) as recorder:
                recovery = inject(demo, recorder, program, "kill")
            row.measured(recovery)
            check_recovery(recovery, program)
            if program.endswith("_gateway"):  # issue 4: link loss -> holding within 500 ms
                assert recovery.hold_s is not None and recovery.hold_s <= HOLD_WITHIN_S, recovery


@pytest.mark.parametrize(
    "program", ["robot_gateway", "teleop_gateway", "robot_session", "teleop_session"]
)
def test_sigstop_then_sigcont(
    program: str, shared: SharedDemo, fault_log: FaultLog, request
) -> None:
    with fault_log.case(f"SIGSTOP {PAUSE_S:.0f} s, SIGCONT", program, request.node.nodeid) as row:
        demo = shared.healthy()
        with recording(demo) as recorder:
            recovery = inject(demo, recorder, program, "pause", pause_s=PAUSE_S)
        row.measured(recovery)
        check_recovery(recovery, program)
        if program.endswith("_gateway"):
            # The peer's ping/pong declares the link lost; the follower holds, the session is
            # re-paired once the paused gateway wakes up.
            assert recovery.hold_s is not None and recovery.hold_s <= HOLD_WITHIN_S, recovery
        else:
            # A paused session manager only stops refreshing presence: the live link and its
            # session must go on untouched.
            assert not recovery.interrupted, recovery.states
            assert recovery.session_after == recovery.session_before


# --- broker -----------------------------------------------------------------------------------


def broker_case(
    shared: SharedDemo, fault_log: FaultLog, fault: str, test: str, action: str
) -> None:
    """Break the demo's broker (`kill`: SIGKILL, supervisord restarts it; `restart`: stop and
    start; `outage`: stopped for BROKER_OUTAGE_S) during a live session. Control must keep
    flowing peer to peer throughout, the session must survive, and the stations' retained
    presence must be back (online, in that session) once the broker is."""
    with fault_log.case(fault, "broker", test) as row:
        demo = shared.healthy()
        with recording(demo) as recorder:
            session = wait_healthy(demo, recorder, HEALTHY_WITHIN_S)
            pid = int(demo.programs()["broker"]["pid"])
            fault_ns = time.time_ns()
            if action == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                demo.call("stopProcess", "broker", True)
                if action == "outage":
                    time.sleep(BROKER_OUTAGE_S)
                    during = recorder.session(since_ns=time.time_ns() - 1_500_000_000)
                    assert during == session, "the session did not survive the broker outage"
                demo.call("startProcess", "broker", False)  # back_ns: its spawn, not RUNNING
            recovery = Recovery(fault_ns, fault_ns, session)

            def broker_back() -> bool:
                info = demo.programs()["broker"]
                new_pid = int(info["pid"]) not in (0, pid)
                if new_pid and recovery.restarted_s is None:
                    recovery.restarted_s = (time.time_ns() - fault_ns) / 1e9
                return info["statename"] == "RUNNING" and new_pid

            wait_recovered(demo, recorder, recovery, broker_back, HEALTHY_WITHIN_S)
            back_ns = fault_ns + int((recovery.restarted_s or 0.0) * 1e9)
            wait_presence_restored(
                demo.env_broker_url, "demo", "demo-robot", "demo-teleop", session, 60.0
            )
            presence_s = (time.time_ns() - back_ns) / 1e9
            judge(recorder, recovery)
        row.measured(recovery, presence_s=round(presence_s, 2))
        row.behaviour += (
            "; both stations' retained presence online again once they reconnect (paho's "
            "backoff, at most 10 s apart)"
        )
        assert not recovery.interrupted, f"control stopped: {recovery.states}"
        assert recovery.session_after == session
        assert recovery.max_step_ratio <= 1.0
        assert recovery.out_of_order == []


def test_broker_sigkill_during_a_session(shared: SharedDemo, fault_log: FaultLog, request) -> None:
    broker_case(shared, fault_log, "SIGKILL (supervisord restarts it)", request.node.nodeid, "kill")


def test_broker_restart_during_a_session(shared: SharedDemo, fault_log: FaultLog, request) -> None:
    broker_case(shared, fault_log, "restart (stop, start)", request.node.nodeid, "restart")


def test_broker_stopped_during_a_session(shared: SharedDemo, fault_log: FaultLog, request) -> None:
    broker_case(
        shared,
        fault_log,
        f"stopped {BROKER_OUTAGE_S:.0f} s, then started",
        request.node.nodeid,
        "outage",
    )
