"""Runs a real station config (deploy/*.conf) under real supervisord, isolated in a temp dir.

Shared by the integration tests (tests/support/station.py re-exports it) and the benchmarks
(bench/), which both need whole stations exactly as `rdv robot/teleop/demo` run them. The config
file itself is used unchanged: it is symlinked into a fresh temp directory, so its
`%(here)s/../run/<station>` paths (sockets, logs) land there and not in the checkout. Ports get a
free offset. `stop()` ends exactly the supervisord this started (by pid), checks its children are
gone and removes the temp directory. It must never signal a process it did not start.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xmlrpc.client
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from supervisor.xmlrpc import SupervisorTransport

from services.bus import BusMap, load_bus_map
from services.bus.config import REPO_ROOT

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")
RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)


class StationError(AssertionError):
    """A station did not start, a program was not restarted, or children were left running.

    An AssertionError so that a test using a Station fails (not errors) on it, as before the
    runner moved out of tests/.
    """


def free_port_offset(base_ports: list[int], attempts: int = 50) -> int:
    """An offset at which every port in base_ports is free on 127.0.0.1 right now."""
    for _ in range(attempts):
        offset = random.randrange(10_000, 50_000, 10)
        if all(_port_free(port + offset) for port in base_ports):
            return offset
    raise RuntimeError("no free port offset found")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _station_offsets(conf: Path) -> set[int]:
    """The per-station port offsets a config sets (demo.conf: robot 0, teleop 100)."""
    found = re.findall(r'RDV_STATION_PORT_OFFSET="(\d+)"', conf.read_text())
    return {0, *(int(value) for value in found)}


class Station:
    def __init__(
        self, conf_name: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> None:
        # prefix: argv run before supervisord, which it must exec (e.g. `ip netns exec NS`), so
        # the pid this holds stays supervisord's own.
        self.prefix = list(prefix or [])
        self.name = Path(conf_name).stem
        self.root = Path(tempfile.mkdtemp(prefix="rdv-"))  # short: ipc paths max 107 bytes
        deploy = self.root / "deploy"
        deploy.mkdir()
        for item in (conf_name, "rdv-service"):
            (deploy / item).symlink_to(REPO_ROOT / "deploy" / item)
        self.conf = deploy / conf_name
        self.run_dir = self.root / "run" / self.name
        self.run_dir.mkdir(parents=True)
        probe = load_bus_map(run_dir=self.run_dir, port_offset=0)
        base = [spec.metrics_port for spec in probe.processes.values()] + [
            spec.bus_port for spec in probe.processes.values()
        ]
        offsets = _station_offsets(self.conf)
        self.port_offset = free_port_offset([p + o for p in base for o in offsets])
        self.bus: BusMap = load_bus_map(run_dir=self.run_dir, port_offset=self.port_offset)
        self.env = {
            **os.environ,
            "RDV_PYTHON": sys.executable,
            "RDV_PORT_OFFSET": str(self.port_offset),
            **(env or {}),
        }
        self.env_broker_url = f"mqtt://127.0.0.1:{self.env.get('RDV_BROKER_PORT', '18830')}"
        self.process: subprocess.Popen | None = None
        self.child_pids: set[int] = set()
        self._rpc: Any = None

    def start(self, programs: list[str], timeout_s: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [*self.prefix, SUPERVISORD, "-c", str(self.conf)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.state(name) == "RUNNING" for name in programs):
                for name in programs:
                    self.pid(name)  # remembered, so stop() can prove they are gone
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise StationError(f"station did not start: {self.status_text()}\n{self.logs()}")

    def programs(self) -> dict[str, dict[str, Any]]:
        """name -> supervisord's process info for every program it runs (pids remembered)."""
        infos = {info["name"]: info for info in self.call("getAllProcessInfo")}
        self.child_pids.update(int(info["pid"]) for info in infos.values() if info["pid"])
        return infos

    def wait_all_running(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Wait until every program the config defines is RUNNING (a program added to the config
        is waited for without naming it); after start([])."""
        deadline = time.monotonic() + timeout_s
        infos: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            try:
                infos = self.programs()
            except RPC_ERRORS:  # supervisord's socket is not up yet
                infos = {}
            if infos and all(info["statename"] == "RUNNING" for info in infos.values()):
                return infos
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise StationError(f"not every program is running: {self.status_text()}\n{self.logs()}")

    @property
    def rpc(self) -> Any:
        """supervisord's XML-RPC interface: milliseconds per call, where each supervisorctl
        run is a new Python process. Prefer `call()`, which recovers from a failed request."""
        if self._rpc is None:
            socket_path = self.run_dir / "supervisor.sock"
            transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._rpc

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SUPERVISORCTL, "-c", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def call(self, method: str, *args: Any) -> Any:
        """One supervisord XML-RPC call such as call("startProcess", "robot_gateway", False).
        Raises OSError, xmlrpc.client.Error or http.client.HTTPException when it fails."""
        try:
            return getattr(self.rpc.supervisor, method)(*args)
        except RPC_ERRORS:
            self._rpc = None  # the transport's connection is unusable after a failed request
            raise

    def _info(self, program: str) -> dict[str, Any] | None:
        try:
            return self.call("getProcessInfo", program)
        except RPC_ERRORS:
            return None  # supervisord not up yet, or no such program

    def status_text(self) -> str:
        try:
            infos = self.call("getAllProcessInfo")
        except RPC_ERRORS as exc:
            return f"supervisord not answering: {exc}"
        return "\n".join(
            f"{info['name']:<20}{info['statename']:<10}{info['description']}" for info in infos
        )

    def state(self, program: str) -> str | None:
        info = self._info(program)
        return None if info is None else info["statename"]

    def pid(self, program: str) -> int:
        info = self._info(program)
        pid = 0 if info is None else int(info["pid"])
        if pid:
            self.child_pids.add(pid)
        return pid

    def wait_for_new_pid(self, program: str, old_pid: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state(program) == "RUNNING":
                pid = self.pid(program)
                if pid not in (0, old_pid):
                    return pid
            time.sleep(0.05)
        raise StationError(f"{program} was not restarted: {self.status_text()}")

    def metric(self, process: str, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample of a process's /metrics (0.0 when absent)."""
        url = f"http://127.0.0.1:{self.bus.metrics_port(process)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(key) == value for key, value in (labels or {}).items()
                ):
                    return sample.value
        return 0.0

    def metric_samples(
        self,
        process: str,
        prefix: str,
        labels: dict[str, str] | None = None,
        station_offset: int = 0,
    ) -> dict[str, float]:
        """Samples of a process's /metrics whose name starts with `prefix`, keyed by name plus
        their other labels (`rdv_x_bucket{le=0.001}`). station_offset: demo.conf's teleop
        station serves its metrics 100 ports above the robot's."""
        port = self.bus.metrics_port(process) + station_offset
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.startswith(prefix) or not all(
                    sample.labels.get(key) == value for key, value in (labels or {}).items()
                ):
                    continue
                rest = {k: v for k, v in sample.labels.items() if k not in (labels or {})}
                suffix = ",".join(f"{k}={v}" for k, v in sorted(rest.items()))
                out[f"{sample.name}{{{suffix}}}" if suffix else sample.name] = sample.value
        return out

    def logs(self) -> str:
        out = []
        for path in sorted(self.run_dir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        survivors = [pid for pid in self.child_pids if _alive_service(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise StationError(f"supervisord left children running: {survivors}")


def _alive_service(pid: int) -> bool:
    """Still running and still an rdv service (a recycled pid is someone else's process)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split(")")[-1].split()[0] == "Z":
                return False  # exited, not yet reaped
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"services." in cmdline.read()
    except OSError:
        return False
