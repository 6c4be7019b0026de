"""Runs a real station config (deploy/*.conf) under real supervisord, isolated for a test.

The config file itself is used unchanged: it is symlinked into a fresh temp directory, so its
`%(here)s/../run/<station>` paths (sockets, logs) land there and not in the checkout. Ports get
a free offset. `stop()` ends exactly the supervisord this started (by pid), checks its children
are gone and removes the temp directory.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.bus import BusMap, load_bus_map
from services.bus.config import REPO_ROOT

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")


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


class Station:
    def __init__(self, conf_name: str, env: dict[str, str] | None = None) -> None:
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
        self.port_offset = free_port_offset(
            [spec.metrics_port for spec in probe.processes.values()]
            + [spec.bus_port for spec in probe.processes.values()]
        )
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

    def start(self, programs: list[str], timeout_s: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [SUPERVISORD, "-c", str(self.conf)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.state(name) == "RUNNING" for name in programs):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"station did not start: {self.status_text()}\n{self.logs()}")

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SUPERVISORCTL, "-c", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status_text(self) -> str:
        return self.ctl("status").stdout

    def state(self, program: str) -> str | None:
        for line in self.status_text().splitlines():
            fields = line.split()
            if fields and fields[0] == program:
                return fields[1]
        return None

    def pid(self, program: str) -> int:
        pid = int(self.ctl("pid", program).stdout.strip())
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
            time.sleep(0.1)
        raise AssertionError(f"{program} was not restarted: {self.status_text()}")

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
        assert not survivors, f"supervisord left children running: {survivors}"


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
