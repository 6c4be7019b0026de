"""Faults around whole stations under real supervisord: the broker down when they start, the
production broker config (persistence, ACL) restarting under a live session, a run dir that
cannot be written, and a full disk.

The broker cases run the per-station files a deployment uses (deploy/robot.conf and
deploy/teleop.conf, each under its own supervisord, identities from `register` for owner alice)
against Mosquitto running the shipped deploy/mosquitto/mosquitto.conf. The file-system cases
mount a read-only bind or a small tmpfs over a station's run dir, and skip, saying why, where
the kernel does not allow mounts. Each case adds its measured behaviour to the results log
(docs/reliability.md). Mounts are undone and processes stopped by pid whatever happens.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from services.demo import prepare_demo_identities
from services.station_runner import SUPERVISORD
from tests.support.broker import ACL_USERS, Mosquitto
from tests.support.demo import demo_station, start_demo
from tests.support.faults import (
    STEADY_S,
    FaultLog,
    Recovery,
    fill,
    inject,
    judge,
    read_only,
    small_tmpfs,
    wait_healthy,
    wait_presence_restored,
    wait_recovered,
)
from tests.support.recorder import BusRecorder
from tests.support.rendezvous import Stations
from tests.support.station import Station

pytestmark = pytest.mark.integration
SERVICES = {"robot": ["follower_arm", "session_manager", "gateway"],
            "teleop": ["leader_arm", "session_manager", "gateway"]}  # fmt: skip
BROKER_DOWN_S = 12.0  # long enough for four attempts at a 1, 2, 4 s backoff
RECONNECT_MAX_S = 10.0  # services/session_manager/mqtt_link.py
BACKOFF_SLACK_S = 0.5  # a loaded machine delays an attempt a little; not a backoff change
ATTEMPT = re.compile(r"^(\S+ \S+) session_manager WARNING broker .* unreachable \(attempt (\d+)\)")
OWNER = "alice"


def attempt_times(log: Path) -> list[float]:
    """When the session manager's failed broker connections happened (its log's timestamps)."""
    times = []
    for line in log.read_text().splitlines():
        match = ATTEMPT.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


@pytest.fixture
def broker_gone() -> Iterator[Mosquitto]:
    """Mosquitto with the shipped config, started once for its dir and port, then stopped:
    nothing listens on the port until the test starts it again."""
    broker = Mosquitto(acl_users=ACL_USERS, shipped_config=True)
    broker.start()
    try:
        broker.kill()  # keeps the dir (persistence) and the port
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def two_stations(broker_gone: Mosquitto) -> Iterator[tuple[Station, Station]]:
    """deploy/robot.conf and deploy/teleop.conf, not started, registered on that broker."""
    identities = Stations(broker_gone.url, owner=OWNER, username=OWNER, password=ACL_USERS[OWNER])
    started: list[Station] = []
    try:
        robot_id = identities.add("robot-a", "robot")
        teleop_id = identities.add("teleop-a", "teleop")
        identities.trust_all()
        common = {"RDV_ICE_HOSTS": "127.0.0.1", "RDV_MQTT_VERSION": "5"}
        robot = Station("robot.conf", env={**common, "RDV_CONFIG_DIR": str(robot_id.config_dir)})
        started.append(robot)
        teleop_env = {**common, "RDV_CONFIG_DIR": str(teleop_id.config_dir)}
        teleop = Station("teleop.conf", env=teleop_env)
        started.append(teleop)
        yield robot, teleop
    finally:
        for station in started:
            station.stop()
        identities.stop_all()


def test_stations_start_with_the_broker_down_then_ride_a_broker_restart(
    broker_gone: Mosquitto,
    two_stations: tuple[Station, Station],
    fault_log: FaultLog,
    request: pytest.FixtureRequest,
) -> None:
    robot, teleop = two_stations
    broker = broker_gone
    credentials = {"username": OWNER, "password": ACL_USERS[OWNER]}
    by_name = {"robot": robot, "teleop": teleop}

    def services_running() -> bool:
        return all(
            station.state(program) == "RUNNING"
            for name, station in by_name.items()
            for program in SERVICES[name]
        )

    recorder = BusRecorder({"robot": robot.run_dir, "teleop": teleop.run_dir})
    test = request.node.nodeid
    with fault_log.case("broker down at station start-up", "both stations", test) as row:
        for name, station in by_name.items():
            station.start(SERVICES[name])
        managers = {name: station.pid("session_manager") for name, station in by_name.items()}
        time.sleep(BROKER_DOWN_S)
        gaps: dict[str, list[float]] = {}
        for name, station in by_name.items():
            assert station.state("session_manager") == "RUNNING", station.logs()
            assert station.pid("session_manager") == managers[name], "it crashed, not retried"
            times = attempt_times(station.run_dir / "session_manager.log")
            gaps[name] = [round(b - a, 2) for a, b in itertools.pairwise(times)]
            assert len(times) >= 3, f"{name}: no retries logged\n{station.logs()}"
            # paho's backoff: each wait doubles from 1 s up to 10 s. No storm, and it backs off.
            assert all(gap >= 1.0 - BACKOFF_SLACK_S for gap in gaps[name]), gaps
            assert all(
                later >= earlier - BACKOFF_SLACK_S
                for earlier, later in itertools.pairwise(gaps[name])
            ), gaps
            assert max(gaps[name]) <= RECONNECT_MAX_S + BACKOFF_SLACK_S, gaps
        with recorder:
            up_ns = time.time_ns()
            broker.start()
            recovery = Recovery(up_ns, up_ns, None)
            wait_recovered(robot, recorder, recovery, services_running, 60.0)
            judge(recorder, recovery)
        row.measured(recovery)
        longest = max(max(g) for g in gaps.values())
        row.behaviour = (
            "session managers keep running and retry with a doubling backoff (attempt gaps "
            f"{gaps['robot']} s, capped at {RECONNECT_MAX_S:.0f} s); when the broker starts they "
            f"connect on their next attempt (up to {longest:.0f} s later here), pair and "
            "teleoperate (times from the broker's start)"
        )
        row.figures["hold_s"] = None  # the follower waits for its first command: not a hold
        assert recovery.max_step_ratio <= 1.0
        assert recovery.out_of_order == []

    recorder = BusRecorder({"robot": robot.run_dir, "teleop": teleop.run_dir})
    with (
        fault_log.case(
            "restart (stop, start) of the shipped deploy/mosquitto config: persistence on, so "
            "every Last Will is kept as a retained offline",
            "broker",
            request.node.nodeid,
        ) as row,
        recorder,
    ):
        session = wait_healthy(robot, recorder, 60.0, running=services_running)
        fault_ns = time.time_ns()
        broker.restart()  # SIGTERM: Mosquitto publishes every Last Will, saves, then starts
        back_ns = time.time_ns()
        recovery = Recovery(fault_ns, fault_ns, session)
        wait_presence_restored(broker.url, OWNER, "robot-a", "teleop-a", session, 60.0,
                               **credentials)  # fmt: skip
        presence_s = (time.time_ns() - back_ns) / 1e9
        wait_recovered(robot, recorder, recovery, services_running, 60.0)
        judge(recorder, recovery)
        row.measured(recovery, presence_s=round(presence_s, 2))
        row.behaviour += "; both stations' retained presence online again in the session"
        assert not recovery.interrupted, f"control stopped: {recovery.states}"
        assert recovery.session_after == session
        assert recovery.max_step_ratio <= 1.0


def test_unwritable_run_dir_supervisord_refuses_with_the_path(
    fault_log: FaultLog, request: pytest.FixtureRequest
) -> None:
    """`supervisord -c deploy/robot.conf` with run/robot read-only: it stops at once naming the
    file it cannot create, and starts nothing (so nothing can loop)."""
    station = Station("robot.conf")
    try:
        with (
            fault_log.case(
                "run dir read-only at start", "robot station", request.node.nodeid
            ) as row,
            read_only(station.run_dir),
        ):
            started = time.monotonic()
            result = subprocess.run(
                [SUPERVISORD, "-c", str(station.conf)],
                env=station.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            took_s = time.monotonic() - started
            last_line = (result.stderr.strip().splitlines() or [""])[-1]
            row.figures = {"exited_s": round(took_s, 2)}
            row.behaviour = (
                f"supervisord exits with code {result.returncode} before starting anything: "
                f"`{last_line.replace(str(station.root), '<root>')}`"
            )
            assert result.returncode != 0
            assert "Read-only file system" in last_line and str(station.run_dir) in last_line
            assert not list(station.run_dir.iterdir()), "something was created in a ro dir"
    finally:
        station.stop()


@pytest.fixture(scope="module")
def unwritable_bus_dir() -> Iterator[tuple[dict[str, dict], dict[str, int], Station]]:
    """The demo with the robot station's bus dir (run/demo/robot) read-only: supervisord's own
    files are fine, the robot services cannot bind their bus sockets. Watched until every robot
    service has settled and for as long again: (final process infos, spawns per program,
    the demo)."""
    demo = demo_station()
    bus_dir = demo.run_dir / "robot"
    try:
        prepare_demo_identities(demo.run_dir, demo.env_broker_url)
        with read_only(bus_dir):
            demo.start(["broker", "teleop_arm", "teleop_session", "teleop_gateway"])
            deadline = time.monotonic() + 30
            settled_at = None
            while time.monotonic() < deadline:
                infos = demo.programs()
                robot = [i for n, i in infos.items() if n.startswith("robot_")]
                if settled_at is None and all(i["statename"] in ("EXITED", "FATAL") for i in robot):
                    settled_at = time.monotonic()
                if settled_at is not None and time.monotonic() - settled_at > 5:
                    break
                time.sleep(0.2)
            infos = demo.programs()
            log = (demo.run_dir / "supervisord.log").read_text()
            spawns = {name: log.count(f"spawned: '{name}'") for name in infos}
            yield infos, spawns, demo
            demo.stop()
    finally:
        demo.stop()
        shutil.rmtree(demo.root, ignore_errors=True)


@pytest.mark.parametrize(
    "program",
    [
        "robot_arm",
        "robot_session",
        "robot_gateway",
        "robot_camera",
    ],
)
def test_unwritable_bus_dir_each_service_exits_78_once_with_the_dir(
    program: str,
    unwritable_bus_dir: tuple[dict[str, dict], dict[str, int], Station],
    fault_log: FaultLog,
    request: pytest.FixtureRequest,
) -> None:
    infos, spawns, demo = unwritable_bus_dir
    with fault_log.case("bus dir read-only (station running)", program, request.node.nodeid) as row:
        info = infos[program]
        text = (demo.run_dir / f"{program}.log").read_text()
        errors = [line for line in text.splitlines() if " ERROR " in line]
        row.figures = {"spawns": spawns[program]}
        said = errors[-1].split(" ERROR ", 1)[1] if errors else "no error line"
        row.behaviour = (
            f"{info['statename']} (exit {info['exitstatus']}), not retried; logged: "
            f"`{said.replace(str(demo.root), '<root>')}`"
        )
        assert "cannot bind the bus endpoint" in text and "must be a writable directory" in text
        assert "Traceback" not in text, "a traceback instead of one clear line"
        assert spawns[program] == 1, "retried: a configuration error must be final"
        assert info["statename"] == "EXITED" and info["exitstatus"] == 78, info


def test_unwritable_bus_dir_leaves_the_other_station_running(
    unwritable_bus_dir: tuple[dict[str, dict], dict[str, int], Station],
) -> None:
    infos, spawns, _demo = unwritable_bus_dir
    for program in ("broker", "teleop_arm", "teleop_session", "teleop_gateway"):
        assert infos[program]["statename"] == "RUNNING", infos[program]
        assert spawns[program] == 1


def test_disk_full_during_a_session(fault_log: FaultLog, request: pytest.FixtureRequest) -> None:
    """The demo's run dir on a small tmpfs, filled while the stations teleoperate. Nothing on
    the control path writes to disk: control goes on, a killed gateway is restarted and the
    session re-paired, and a restarted broker comes back on the config it wrote before."""
    demo = demo_station()
    try:
        with small_tmpfs(demo.run_dir, "16m"):
            start_demo(demo)
            recorder = BusRecorder(
                {"robot": demo.run_dir / "robot", "teleop": demo.run_dir / "teleop"}
            )
            with (
                fault_log.case("disk full (run dir)", "demo", request.node.nodeid) as row,
                recorder,
            ):
                session = wait_healthy(demo, recorder, 60.0)
                before = {name: info["pid"] for name, info in demo.programs().items()}
                filler = fill(demo.run_dir)
                full_ns = time.time_ns()
                time.sleep(2 * STEADY_S)
                calm = Recovery(full_ns, full_ns, session)
                judge(recorder, calm)
                assert not calm.interrupted, f"control stopped on a full disk: {calm.states}"

                killed = inject(demo, recorder, "robot_gateway", "kill")
                assert killed.tracking_after_resume_s is not None
                assert killed.tracking_after_resume_s <= 10.0, killed
                assert killed.max_step_ratio <= 1.0 and killed.out_of_order == []

                broker_pid = before["broker"]
                demo.call("stopProcess", "broker", True)
                demo.call("startProcess", "broker", True)
                assert demo.programs()["broker"]["pid"] != broker_pid
                wait_presence_restored(
                    demo.env_broker_url, "demo", "demo-robot", "demo-teleop", None, 60.0
                )
                after = demo.programs()
                respawned = {n for n in after if after[n]["pid"] != before[n]}
                assert respawned == {"robot_gateway", "broker"}, "something else restarted"
                assert all(i["statename"] == "RUNNING" for i in after.values()), after
                row.measured(killed)
                row.behaviour = (
                    "control goes on (nothing on the control path writes to disk); a SIGKILLed "
                    f"gateway is restarted and the session re-paired ({killed.tracking_s:.1f} s "
                    "to tracking), a restarted broker reuses the config it wrote before; log "
                    "lines are lost until space returns"
                )
                filler.unlink()
    finally:
        demo.stop()
        shutil.rmtree(demo.root, ignore_errors=True)
