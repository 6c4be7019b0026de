"""monitoring/ against real tools: promtool on the shipped files, and every dashboard panel query
answered by a real Prometheus scraping the running demo.

The live test runs deploy/demo.conf under real supervisord (identities prepared as `rdv demo`
does; every program the config has), the fleet exporter as a user starts it (`rdv fleet
--metrics-port`), and a real Prometheus on the SHIPPED monitoring/prometheus.yml and alerts.yml,
only its targets moved to this test's ports. It then makes real things happen to the stations:
stale and malformed commands on the robot's bus (refused and dropped by the follower), and a
SIGKILL of the robot's gateway (the session ends, the deadman trips, the stations re-pair).
Every panel query of every dashboard is then run through Prometheus' HTTP API as Grafana runs
it (instant or range, variables resolved through the label API) and must return data.

The demo's robot station runs a sim camera (`robot_camera`), so the video panels are held to
the same rule as the others. Every process started here is stopped by pid; every temp dir is
removed.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from services.bus import FollowerFrame, JointFrame, Subscriber, load_bus_map
from services.bus.config import REPO_ROOT
from services.bus.frames import FrameEncoder
from services.demo import prepare_demo_identities
from services.fleet_exporter import DEFAULT_METRICS_PORT
from tests.support import grafana
from tests.support.arm_checks import wait_for_state
from tests.support.broker import free_port
from tests.support.demo import STATION_PORT_SHIFT
from tests.support.prometheus import (
    Prometheus,
    Results,
    all_values,
    promtool,
    rewrite_targets,
    terminate,
    values,
)
from tests.support.station import Station

pytestmark = pytest.mark.integration
MONITORING = REPO_ROOT / "monitoring"
RDV = str(Path(sys.executable).parent / "rdv")
DEMO_PROGRAMS = re.findall(
    r"^\[program:(\w+)\]", (REPO_ROOT / "deploy" / "demo.conf").read_text(), re.M
)
TELEOP_PORT_SHIFT = STATION_PORT_SHIFT["teleop"]  # the teleop programs of deploy/demo.conf
# What monitoring/prometheus.yml scrapes in the demo: (job, station label) per target.
EXPECTED_TARGETS = {
    ("rdv_follower_arm", "demo-robot"),
    ("rdv_leader_arm", "demo-teleop"),
    ("rdv_session_manager", "demo-robot"),
    ("rdv_session_manager", "demo-teleop"),
    ("rdv_gateway", "demo-robot"),
    ("rdv_gateway", "demo-teleop"),
    ("rdv_camera", "demo-robot"),
    ("rdv_fleet", None),
}
STEP_S = 5.0  # Grafana's step on a short range: the datasource's timeInterval (scrape interval)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "tests/alerts_test.yml"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_promtool_accepts_the_shipped_files(args: tuple[str, ...]) -> None:
    result = promtool(*args, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@dataclass
class FleetExporter:
    """`rdv fleet --metrics-port N` as its own process, stopped by pid."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @classmethod
    def start(cls, config_dir: Path, log_path: Path) -> FleetExporter:
        port = free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [RDV, "fleet", "--metrics-port", str(port), "--config-dir", str(config_dir),
                 "--mqtt-version", "5"],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        exporter = cls(process, port, log_path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                    return exporter
            except OSError:
                time.sleep(0.1)
        exporter.stop()
        raise AssertionError(f"fleet exporter did not serve: {exporter.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        """SIGTERM (what supervisord sends), wait, SIGKILL if it hangs; its exit code."""
        return terminate(self.process, grace_s=10)


@dataclass
class Stack:
    demo: Station
    exporter: FleetExporter
    prometheus: Prometheus
    started_s: float  # wall time Prometheus started: the dashboards' time range begins here

    def context(self) -> str:
        return f"{self.prometheus.log_text()}\n{self.exporter.log()}\n{self.demo.logs()}"


@pytest.fixture
def stack() -> Iterator[Stack]:
    broker_port = free_port()
    demo = Station("demo.conf", env={"RDV_BROKER_PORT": str(broker_port), "RDV_MQTT_VERSION": "5"})
    exporter: FleetExporter | None = None
    prometheus: Prometheus | None = None
    try:
        prepare_demo_identities(demo.run_dir, f"mqtt://127.0.0.1:{broker_port}")
        demo.start(DEMO_PROGRAMS)
        exporter = FleetExporter.start(
            demo.run_dir / "teleop" / "config", demo.root / "fleet_exporter.log"
        )
        # The shipped ports, moved to this test's: the robot station at the bus map's ports,
        # the teleop station 100 up (as in deploy/demo.conf), the fleet exporter at its own.
        base = load_bus_map(run_dir=demo.run_dir, port_offset=0)
        ports = {DEFAULT_METRICS_PORT: exporter.port}
        for spec in base.processes.values():
            for shift in (0, TELEOP_PORT_SHIFT):
                ports[spec.metrics_port + shift] = spec.metrics_port + shift + demo.port_offset
        config = rewrite_targets((MONITORING / "prometheus.yml").read_text(), ports)
        prometheus = Prometheus(config, files={"alerts.yml": MONITORING / "alerts.yml"})
        started_s = time.time()
        prometheus.start()
        yield Stack(demo, exporter, prometheus, started_s)
    finally:
        if prometheus is not None:
            prometheus.stop()
        if exporter is not None:
            exporter.stop()
        demo.stop()


class BadCommands(threading.Thread):
    """Stale and malformed joints.command frames into the robot station's bus, 10 a second.

    Bound where the station's `local_link` would publish (the demo runs none; the follower
    connects to every joints.command publisher). A stale command (5 s old, at the follower's own
    position) is refused as too_old; a frame that is not msgpack is dropped as malformed. The
    arm never moves for either. Sent for longer than a scrape interval, so Prometheus sees each
    counter rise after its series first appears.
    """

    def __init__(self, demo: Station, position: tuple[float, ...], seconds: float) -> None:
        super().__init__(daemon=True)
        bus = load_bus_map(run_dir=demo.run_dir / "robot", port_offset=demo.port_offset)
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bus.endpoint("local_link"))
        self.position = position
        self.seconds = seconds
        self.sent = 0

    def run(self) -> None:
        encoder = FrameEncoder()
        deadline = time.monotonic() + self.seconds
        try:
            while time.monotonic() < deadline:
                stale = JointFrame(self.sent, time.time_ns() - 5_000_000_000, "test", self.position)
                self.socket.send_multipart(encoder.encode("joints.command", stale))
                self.socket.send_multipart([b"joints.command", b"\xc1 not msgpack"])
                self.sent += 1
                time.sleep(0.1)
        finally:
            self.socket.close(linger=0)


def follower_position(follower: Subscriber) -> tuple[float, ...]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        received = follower.recv(timeout_ms=100)
        if received is not None and isinstance(received.frame, FollowerFrame):
            return received.frame.pos
    raise AssertionError("no joints.follower from the robot station")


def variable_values(prometheus: Prometheus, dashboard: dict) -> dict[str, str]:
    """Each query variable resolved as Grafana does on load: its first value, sorted."""
    chosen = {}
    for name, var in grafana.variables(dashboard).items():
        if var["type"] != "query":
            continue
        selector, label = grafana.label_values_query(grafana.variable_query(var))
        options = sorted(prometheus.api(f"label/{label}/values", **{"match[]": selector}))
        assert options, f"{dashboard['title']}: variable ${name} has no values ({selector})"
        chosen[name] = options[0]
    return chosen


def has_data(result: Results) -> bool:
    """At least one series with at least one number (a quantile of nothing is NaN)."""
    return any(not math.isnan(value) for value in all_values(result))


def run_panel_queries(stack: Stack) -> dict[str, tuple[grafana.Query, Results]]:
    """Every panel query of every dashboard, run as Grafana runs it over the time range so far."""
    prometheus = stack.prometheus
    now = time.time()
    builtins = {
        "__rate_interval": grafana.rate_interval(),
        "__range": f"{math.ceil(now - stack.started_s)}s",
    }
    answers = {}
    for dashboard in grafana.dashboards().values():
        chosen = {**builtins, **variable_values(prometheus, dashboard)}
        for query in grafana.queries(dashboard):
            expr = grafana.expand(query.expr, chosen)
            if query.instant:
                result = prometheus.query(expr)
            else:
                result = prometheus.query_range(expr, stack.started_s, now, STEP_S)
            answers[query.name] = (query, result)
    return answers


def peak(answers: dict, dashboard: str, panel: str, **labels: str) -> float:
    """Highest value one panel showed in the series carrying these labels (NaN: none)."""
    found = [
        value
        for query, result in answers.values()
        if (query.dashboard, query.panel) == (dashboard, panel)
        for one in result
        if all(one["metric"].get(key) == wanted for key, wanted in labels.items())
        for value in all_values([one])
        if not math.isnan(value)
    ]
    return max(found, default=math.nan)


def test_every_dashboard_panel_query_returns_data_from_the_running_demo(stack: Stack) -> None:
    prometheus, demo = stack.prometheus, stack.demo
    up = prometheus.wait_for("up", lambda r: len(r) == len(EXPECTED_TARGETS) and all(values(r)))
    assert len(up) == len(EXPECTED_TARGETS) and all(values(up)), f"up: {up}\n{stack.context()}"
    targets = {(t["labels"]["job"], t["labels"].get("station")) for t in prometheus.targets()}
    assert targets == EXPECTED_TARGETS

    # Real events: refused and dropped commands, then the robot's gateway killed mid-session.
    follower = Subscriber(load_bus_map(run_dir=demo.run_dir / "robot"), ["joints.follower"])
    try:
        wait_for_state(follower, "tracking", timeout_s=40)
        bad = BadCommands(demo, follower_position(follower), seconds=1.5 * STEP_S)
        bad.start()
        os.kill(demo.pid("robot_gateway"), signal.SIGKILL)
        wait_for_state(follower, "stale", timeout_s=10)
        wait_for_state(follower, "tracking", timeout_s=40)
        bad.join(timeout=30)
        assert bad.sent > 0 and not bad.is_alive()
    except AssertionError:
        print(stack.context())
        raise
    finally:
        follower.close()

    # Every panel query, until each has data (scrapes and rate windows need a few intervals).
    deadline = time.monotonic() + 60
    while True:
        answers = run_panel_queries(stack)
        empty = [name for name, (_, result) in answers.items() if not has_data(result)]
        if not empty or time.monotonic() >= deadline:
            break
        time.sleep(STEP_S / 2)
    for name, (_, result) in sorted(answers.items()):
        print(f"{name}: {len(result)} series")
    assert not empty, f"panel queries without data: {empty}\n{stack.context()}"

    # The events, as the panels show them (NaN, no series, fails these too).
    teleop, fleet = "rdv: Teleop session", "rdv: Fleet"
    assert peak(answers, teleop, "Commands rejected by the follower", reason="too_old") > 0
    dropped = peak(
        answers, teleop, "Frames dropped",
        station="demo-robot", stream="joints.command", reason="malformed",
    )  # fmt: skip
    assert dropped > 0, "the malformed commands do not show as drops"
    assert peak(answers, teleop, "Watchdog trips (time range)") >= 1
    assert peak(answers, teleop, "Watchdog trips") > 0
    assert peak(answers, fleet, "Watchdog trips per robot station (time range)") >= 1
    assert peak(answers, teleop, "Cameras", camera="front") == 1  # demo.conf: one sim camera
    assert peak(answers, teleop, "Video frames decoded per second", camera="front") > 0
    live = {
        one["metric"]["station"]: one["metric"]["state"]
        for one in prometheus.query('rdv_session_state{job="rdv_session_manager"} == 1')
    }
    assert live == {"demo-robot": "live", "demo-teleop": "live"}, live
    online = prometheus.query('rdv_presence_stations{job="rdv_fleet", status="online"}')
    assert {one["metric"]["role"]: float(one["value"][1]) for one in online} == {
        "robot": 1.0,
        "teleop": 1.0,
    }

    # Alert rules: all loaded and evaluated cleanly; the deadman trip fires its alert, and
    # nothing else is firing.
    firing = prometheus.wait_for('ALERTS{alertstate="firing"}', timeout_s=20)
    assert {one["metric"]["alertname"] for one in firing} == {"RdvWatchdogTripped"}, firing
    rules = prometheus.alerting_rules()
    assert rules and all(rule["health"] == "ok" for rule in rules), rules

    # The exporter ends cleanly on SIGTERM, as under supervisord.
    assert stack.exporter.stop() == 0, stack.exporter.log()
