"""Registered stations running real session-manager processes against a real broker, for tests.

Each station gets its own identity (made with `register`, as `rdv register` does), config dir,
bus run dir and metrics port, all under one temp dir. `stop_all()` ends exactly the processes
started here (by pid) and removes the temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.fleet import FleetWatcher
from services.session_manager.identity import Identity, TrustRoster, register
from tests.support.broker import free_port

INTERVAL_S = 0.5  # presence refresh in tests: offline detection in 1.5 s


@dataclass
class StationProcess:
    name: str
    role: str
    identity: Identity
    config_dir: Path
    run_dir: Path
    log_path: Path
    metrics_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def id(self) -> str:
        return self.identity.station_id

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    return sample.value
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


class Stations:
    def __init__(
        self,
        broker_url: str,
        *,
        owner: str = "alice",
        mqtt_version: str = "5",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.owner = owner
        self.mqtt_version = mqtt_version
        self.username = username
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="rdv-sm-"))
        self.stations: dict[str, StationProcess] = {}

    def add(self, name: str, role: str) -> StationProcess:
        config_dir = self.root / name / "config"
        identity, _ = register(
            config_dir,
            owner=self.owner,
            broker_url=self.broker_url,
            username=self.username,
            password=self.password,
            station_id=name,
        )
        station = StationProcess(
            name, role, identity, config_dir, self.root / name / "run", self.root / f"{name}.log"
        )
        self.stations[name] = station
        return station

    def trust_all(self) -> None:
        """Every station trusts every other one, as an owner does with `rdv trust add`."""
        for station in self.stations.values():
            roster = TrustRoster.load(station.config_dir)
            for other in self.stations.values():
                if other is not station:
                    roster.add(other.id, other.identity.public_key_b64)

    def start(self, station: StationProcess, *extra: str) -> None:
        station.metrics_port = free_port()
        command = [
            sys.executable, "-m", "services.session_manager",
            "--role", station.role,
            "--config-dir", str(station.config_dir),
            "--run-dir", str(station.run_dir),
            "--metrics-port", str(station.metrics_port),
            "--presence-interval", str(INTERVAL_S),
            "--mqtt-version", self.mqtt_version,
            *extra,
        ]  # fmt: skip
        station.process = subprocess.Popen(
            command,
            stdout=station.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "RDV_LOG_LEVEL": "INFO"},
        )

    def start_all(self, *extra: str) -> None:
        for station in self.stations.values():
            self.start(station, *extra)

    def watcher(self) -> FleetWatcher:
        """A read-only presence watcher with the first station's credentials."""
        identity = next(iter(self.stations.values())).identity
        watcher = FleetWatcher(
            identity, mqtt_version=self.mqtt_version, interval_s=INTERVAL_S, skew_s=2.0
        )
        watcher.start()
        return watcher

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()}" for s in self.stations.values())

    def stop(self, station: StationProcess, sig: int = signal.SIGTERM) -> None:
        process = station.process
        if process is None or process.poll() is not None:
            return
        if sig == signal.SIGTERM:
            os.kill(process.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for station in self.stations.values():
            self.stop(station)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(condition, timeout_s: float, pump=None, interval_s: float = 0.1) -> bool:
    """Poll condition() (pumping a watcher between polls) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pump is not None:
            pump(interval_s)
        else:
            time.sleep(interval_s)
        if condition():
            return True
    return False
