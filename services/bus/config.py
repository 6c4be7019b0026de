"""The bus map: endpoints, topics, rates and metrics ports of a station, read from one file.

Every service resolves addresses through `BusMap`; nothing else may invent an endpoint or a
port. This module must never bind to a non-loopback address.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUS_CONFIG = REPO_ROOT / "bus_config" / "bus.toml"
TRANSPORTS = ("ipc", "tcp")
SCHEMAS = ("joints", "follower", "video", "message")
# A Unix socket path is limited to 108 bytes including the terminator on Linux.
MAX_IPC_PATH = 107


class BusConfigError(ValueError):
    """The bus map file or an override is wrong; the message says which entry."""


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    bus_port: int
    metrics_port: int


@dataclass(frozen=True)
class TopicSpec:
    name: str  # exact topic, or a prefix pattern ending in ".*" (video.*)
    schema: str
    publishers: tuple[str, ...]
    rate_hz: float | None

    def matches(self, topic: str) -> bool:
        if self.name.endswith(".*"):
            prefix = self.name[:-1]
            return topic.startswith(prefix) and len(topic) > len(prefix)
        return topic == self.name


@dataclass(frozen=True)
class BusMap:
    path: Path
    schema_version: int
    transport: str
    run_dir: Path
    port_offset: int
    max_frame_bytes: int
    max_video_bytes: int
    send_hwm: int
    recv_hwm: int
    video_hwm: int  # queue bound for video topics: a viewer wants the latest frame, not a backlog
    processes: dict[str, ProcessSpec]
    topics: tuple[TopicSpec, ...]

    def process(self, name: str) -> ProcessSpec:
        try:
            return self.processes[name]
        except KeyError:
            known = ", ".join(sorted(self.processes))
            raise BusConfigError(
                f"unknown process {name!r} in {self.path} (known: {known})"
            ) from None

    def topic(self, topic: str) -> TopicSpec:
        for spec in self.topics:
            if spec.matches(topic):
                return spec
        known = ", ".join(spec.name for spec in self.topics)
        raise BusConfigError(f"unknown topic {topic!r} in {self.path} (known: {known})")

    def endpoint(self, process: str) -> str:
        """Address that `process` binds and that its subscribers connect to."""
        spec = self.process(process)
        if self.transport == "tcp":
            return f"tcp://127.0.0.1:{spec.bus_port + self.port_offset}"
        path = self.run_dir / f"{spec.name}.sock"
        size = len(os.fsencode(path))
        if size > MAX_IPC_PATH:
            raise BusConfigError(
                f"ipc socket path is {size} bytes, over the {MAX_IPC_PATH}-byte limit of "
                f"Unix sockets: {path}. Use a shorter RDV_RUN_DIR or RDV_BUS_TRANSPORT=tcp."
            )
        return f"ipc://{path}"

    def metrics_port(self, process: str) -> int:
        return self.process(process).metrics_port + self.port_offset

    def publishers_of(self, topic: str) -> tuple[str, ...]:
        return self.topic(topic).publishers

    def max_bytes(self, topic: str) -> int:
        return self.max_video_bytes if self.topic(topic).schema == "video" else self.max_frame_bytes


def default_run_dir(station: str = "local") -> Path:
    return REPO_ROOT / "run" / station


def load_bus_map(
    path: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    transport: str | None = None,
    port_offset: int | None = None,
    environ: dict[str, str] | None = None,
) -> BusMap:
    """Read the bus map. Explicit arguments win over RDV_* environment, which wins over the file."""
    env = os.environ if environ is None else environ
    path = Path(path or env.get("RDV_BUS_CONFIG") or DEFAULT_BUS_CONFIG)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BusConfigError(f"bus map not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BusConfigError(f"bus map {path} is not valid TOML: {exc}") from None
    try:
        return _parse(raw, path, run_dir, transport, port_offset, env)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, BusConfigError):
            raise
        raise BusConfigError(f"bus map {path}: bad or missing entry: {exc}") from None


def _parse(
    raw: dict,
    path: Path,
    run_dir: str | Path | None,
    transport: str | None,
    port_offset: int | None,
    env: dict[str, str] | os._Environ[str],
) -> BusMap:
    bus = raw["bus"]
    transport = transport or env.get("RDV_BUS_TRANSPORT") or bus.get("transport", "ipc")
    if transport not in TRANSPORTS:
        raise BusConfigError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if port_offset is None:
        # RDV_PORT_OFFSET shifts a whole machine's ports; RDV_STATION_PORT_OFFSET separates two
        # stations under one supervisord (deploy/demo.conf). Both add up.
        offset_text = env.get("RDV_PORT_OFFSET", "0")
        station_text = env.get("RDV_STATION_PORT_OFFSET", "0")
        try:
            port_offset = int(offset_text) + int(station_text)
        except ValueError:
            raise BusConfigError(
                "RDV_PORT_OFFSET and RDV_STATION_PORT_OFFSET must be integers, got "
                f"{offset_text!r} and {station_text!r}"
            ) from None
    run_dir = Path(run_dir or env.get("RDV_RUN_DIR") or default_run_dir())

    processes = {
        name: ProcessSpec(name, int(spec["bus_port"]), int(spec["metrics_port"]))
        for name, spec in raw["processes"].items()
    }
    topics = []
    for name, spec in raw["topics"].items():
        schema = spec["schema"]
        if schema not in SCHEMAS:
            raise BusConfigError(f"topic {name!r}: schema must be one of {SCHEMAS}")
        publishers = tuple(spec["publishers"])
        for publisher in publishers:
            if publisher not in processes:
                raise BusConfigError(f"topic {name!r}: publisher {publisher!r} is not a process")
        rate = spec.get("rate_hz")
        topics.append(TopicSpec(name, schema, publishers, None if rate is None else float(rate)))

    for spec in processes.values():
        for port in (spec.bus_port, spec.metrics_port):
            if not 0 < port + port_offset < 65536:
                raise BusConfigError(f"{spec.name}: port {port}+{port_offset} is out of range")

    return BusMap(
        path=path,
        schema_version=int(raw["schema_version"]),
        transport=transport,
        run_dir=run_dir,
        port_offset=port_offset,
        max_frame_bytes=int(bus["max_frame_bytes"]),
        max_video_bytes=int(bus["max_video_bytes"]),
        send_hwm=int(bus.get("send_hwm", 1000)),
        recv_hwm=int(bus.get("recv_hwm", 1000)),
        video_hwm=int(bus.get("video_hwm", 2)),
        processes=processes,
        topics=tuple(topics),
    )
