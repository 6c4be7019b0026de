"""A real Prometheus (Debian `prometheus`, /usr/bin/prometheus) for tests, and promtool.

`Prometheus(config_text, files)` writes the config (plus files it refers to, e.g. alerts.yml)
into its own temp dir (`rdv-prom-*`), which also holds the TSDB and the log. `start()` runs it
on 127.0.0.1 at a free port (another one if that port is taken meanwhile) and waits until it is
ready; `query()`, `query_range()` and `wait_for()` use its HTTP API (/api/v1/...). `stop()`
ends exactly the process this started (by its pid: SIGTERM, then SIGKILL after 10 s), reaps it
and removes the temp dir.

`rewrite_targets()` points a shipped scrape config (monitoring/prometheus.yml) at a test's
ports, and fails on a target it was not told about, so a new target cannot go unscraped.

This module must never touch the system Prometheus service or its files (/etc/prometheus,
/var/lib/prometheus), listen anywhere but loopback, or signal a process it did not start.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.broker import free_port

_START_ATTEMPTS = 5
_STOP_GRACE_S = 10.0
_TARGET = re.compile(r"127\.0\.0\.1:(\d+)")

Results = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    """Prometheus did not start or its API answered with an error (the message says why)."""


def tool(name: str) -> str:
    """Path of prometheus or promtool; fails (never skips) when the package is missing."""
    path = shutil.which(name)
    if path is None:
        raise PrometheusError(f"{name} not found (Debian: apt-get install prometheus)")
    return path


def terminate(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM one process this test started, SIGKILL it after grace_s, reap it; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def rewrite_targets(config_text: str, ports: Mapping[int, int]) -> str:
    """The config with every 127.0.0.1:<port> target moved to 127.0.0.1:<ports[port]>.

    Only live lines are checked: a commented-out target (a process that does not exist yet)
    is left as it is.
    """
    lines = []
    for line in config_text.splitlines(keepends=True):
        if not line.lstrip().startswith("#"):
            for port in map(int, _TARGET.findall(line)):
                if port not in ports:
                    raise PrometheusError(f"scrape target port {port} has no test port: {line!r}")
            line = _TARGET.sub(lambda match: f"127.0.0.1:{ports[int(match.group(1))]}", line)
        lines.append(line)
    return "".join(lines)


class Prometheus:
    def __init__(self, config_text: str, files: Mapping[str, str | Path] | None = None) -> None:
        self.config_text = config_text
        self.files = dict(files or {})
        self.port: int | None = None
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("prometheus is not started")
        return self._dir

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("prometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("prometheus is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "prometheus.log"

    def log_text(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except (OSError, RuntimeError):
            return "(no log)"

    # --- life cycle -------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> None:
        if self._process is not None:
            raise RuntimeError(f"prometheus is already running (pid {self.pid})")
        self._dir = Path(tempfile.mkdtemp(prefix="rdv-prom-"))
        try:
            (self._dir / "prometheus.yml").write_text(self.config_text)
            for name, content in self.files.items():
                text = content.read_text() if isinstance(content, Path) else content
                (self._dir / name).write_text(text)
            for _ in range(_START_ATTEMPTS):
                self.port = free_port()
                if self._spawn_and_wait(timeout_s):
                    return
            raise PrometheusError(f"no free port in {_START_ATTEMPTS} attempts")
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self, timeout_s: float) -> bool:
        """True once ready; False when the port was taken meanwhile (caller retries)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                if "address already in use" in self.log_text():
                    return False
                raise PrometheusError(f"prometheus exited at start:\n{self.log_text()}")
            if self._ready():
                return True
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout_s} s:\n{self.log_text()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """End the process this started (by pid), reap it, remove the temp dir."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, _STOP_GRACE_S)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """`data` of GET /api/v1/<path>; raises PrometheusError on an error answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus' reason
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> Results:
        """Instant vector result of `expr` now: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} is a {data['resultType']}, not a vector")
        return data["result"]

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> Results:
        """Range result of `expr`, as a Grafana time-series panel asks for it:
        [{"metric": {...}, "values": [[ts, "v"], ...]}, ...]."""
        data = self.api(
            "query_range",
            query=expr,
            start=f"{start_s:.3f}",
            end=f"{end_s:.3f}",
            step=f"{step_s:g}",
        )
        if data["resultType"] != "matrix":
            raise PrometheusError(f"{expr!r} is a {data['resultType']}, not a matrix")
        return data["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[Results], bool] = bool,
        timeout_s: float = 20.0,
        interval_s: float = 0.5,
    ) -> Results:
        """Query until predicate(result) holds (default: non-empty); the last result either way.

        Callers assert on the predicate again: a timeout returns, it does not raise, so the
        assertion message can show what Prometheus had.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if predicate(result) or time.monotonic() >= deadline:
                return result
            time.sleep(interval_s)

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def alerting_rules(self) -> list[dict[str, Any]]:
        return [
            rule for group in self.api("rules", type="alert")["groups"] for rule in group["rules"]
        ]


def values(result: Results) -> list[float]:
    """The values of an instant result, one per series."""
    return [float(sample["value"][1]) for sample in result]


def all_values(result: Results) -> list[float]:
    """Every value of an instant or range result (NaN included: Prometheus sends "NaN")."""
    out = []
    for series in result:
        points = series["values"] if "values" in series else [series["value"]]
        out += [float(value) for _, value in points]
    return out
