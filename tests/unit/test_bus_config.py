"""Unit tests for the bus map (services/bus/config.py and bus_config/bus.toml).

Covers: the shipped map loads and names every topic of DESIGN.md's contract; ipc and tcp
endpoints (tcp on 127.0.0.1 only) and metrics ports with the port offset; explicit arguments
over RDV_* environment over the file; unknown process/topic errors; the Unix socket path
limit; and BusConfigError with a useful message for broken map files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from services.bus.config import (
    DEFAULT_BUS_CONFIG,
    MAX_IPC_PATH,
    BusConfigError,
    BusMap,
    default_run_dir,
    load_bus_map,
)

# DESIGN.md, "Local bus": topic names are the contract, and the schema each one carries.
DESIGN_TOPICS = {
    "joints.leader": "joints",
    "joints.command": "joints",
    "joints.follower": "follower",
    "video.front": "video",
    "video.wrist": "video",
    "session.control": "message",
    "session.status": "message",
    "health": "message",
}
PROCESSES = {
    "leader_arm": (5701, 9701),
    "follower_arm": (5702, 9702),
    "local_link": (5703, 9703),
    "camera": (5704, 9704),
    "session_manager": (5705, 9705),
    "gateway": (5706, 9706),
    "control": (5707, 9707),  # rdv estop / rdv rearm
}
SHIPPED = DEFAULT_BUS_CONFIG.read_text()


def shipped(
    environ: dict[str, str] | None = None,
    *,
    run_dir: Path | None = None,
    transport: str | None = None,
    port_offset: int | None = None,
) -> BusMap:
    """The shipped map, isolated from the real environment unless `environ` says otherwise."""
    return load_bus_map(
        environ={} if environ is None else environ,
        run_dir=run_dir,
        transport=transport,
        port_offset=port_offset,
    )


def write_map(tmp_path: Path, text: str, name: str = "bus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(old: str, new: str) -> str:
    """The shipped map with one edit; fails loudly if the edit no longer applies."""
    assert SHIPPED.count(old) == 1, f"{old!r} not found once in the shipped bus map"
    return SHIPPED.replace(old, new)


# --- the shipped map ------------------------------------------------------------------------


def test_shipped_map_loads_with_defaults() -> None:
    bus = shipped()
    assert bus.path == DEFAULT_BUS_CONFIG
    assert bus.schema_version == 1
    assert bus.transport == "ipc"
    assert bus.port_offset == 0
    assert bus.run_dir == default_run_dir() == DEFAULT_BUS_CONFIG.parents[1] / "run" / "local"
    assert bus.max_frame_bytes == 4096
    assert bus.max_video_bytes == 8_388_608
    assert (bus.send_hwm, bus.recv_hwm) == (1000, 1000)


def test_shipped_processes_and_ports() -> None:
    bus = shipped()
    assert set(bus.processes) == set(PROCESSES)
    for name, (bus_port, metrics_port) in PROCESSES.items():
        spec = bus.process(name)
        assert (spec.name, spec.bus_port, spec.metrics_port) == (name, bus_port, metrics_port)
    ports = [p for spec in bus.processes.values() for p in (spec.bus_port, spec.metrics_port)]
    assert len(ports) == len(set(ports)), "two processes share a port"


@pytest.mark.parametrize(("topic", "schema"), sorted(DESIGN_TOPICS.items()))
def test_every_design_topic_exists_with_its_schema(topic: str, schema: str) -> None:
    bus = shipped()
    spec = bus.topic(topic)
    assert spec.schema == schema
    assert spec.publishers, f"{topic} has no publisher"
    for publisher in bus.publishers_of(topic):
        assert publisher in bus.processes


def test_shipped_topic_names_are_exactly_the_design_ones() -> None:
    names = {spec.name for spec in shipped().topics}
    assert names == {
        "joints.leader",
        "joints.command",
        "joints.follower",
        "video.*",
        "session.control",
        "session.status",
        "health",
    }


def test_shipped_publishers_and_rates() -> None:
    bus = shipped()
    assert bus.publishers_of("joints.leader") == ("leader_arm",)
    assert set(bus.publishers_of("joints.command")) == {"gateway", "local_link"}
    # The teleop's gateway republishes the robot's follower frames on the teleop bus.
    assert bus.publishers_of("joints.follower") == ("follower_arm", "gateway")
    assert bus.publishers_of("video.front") == ("camera",)
    assert set(bus.publishers_of("health")) == set(PROCESSES) - {"control"}  # lives a second
    assert set(bus.publishers_of("session.control")) == {"session_manager", "gateway", "control"}
    assert bus.topic("joints.leader").rate_hz == 100.0
    assert bus.topic("health").rate_hz == 1.0
    assert bus.topic("session.control").rate_hz is None


def test_max_bytes_per_topic() -> None:
    bus = shipped()
    assert bus.max_bytes("joints.leader") == 4096
    assert bus.max_bytes("health") == 4096
    assert bus.max_bytes("video.front") == 8_388_608


@pytest.mark.parametrize(
    "topic", ["video", "video.", "joints", "joints.leaderX", "joints.leader.x", "Health", ""]
)
def test_unknown_topic(topic: str) -> None:
    with pytest.raises(BusConfigError) as info:
        shipped().topic(topic)
    message = str(info.value)
    assert repr(topic) in message
    assert "joints.leader" in message and "video.*" in message  # lists what is known
    assert str(DEFAULT_BUS_CONFIG) in message


def test_unknown_process() -> None:
    bus = shipped()
    for call in (bus.process, bus.endpoint, bus.metrics_port):
        with pytest.raises(BusConfigError, match=r"unknown process 'robot_arm'.*leader_arm"):
            call("robot_arm")


# --- endpoints and ports --------------------------------------------------------------------


def test_ipc_endpoints_live_in_the_run_dir(tmp_path: Path) -> None:
    bus = shipped(run_dir=tmp_path)
    assert bus.transport == "ipc"
    for name in PROCESSES:
        assert bus.endpoint(name) == f"ipc://{tmp_path}/{name}.sock"
    assert len({bus.endpoint(name) for name in PROCESSES}) == len(PROCESSES)


@pytest.mark.parametrize("offset", [0, 100, -5000])
def test_tcp_endpoints_are_loopback_with_the_offset(offset: int) -> None:
    bus = shipped(transport="tcp", port_offset=offset)
    for name, (bus_port, metrics_port) in PROCESSES.items():
        assert bus.endpoint(name) == f"tcp://127.0.0.1:{bus_port + offset}"
        assert bus.metrics_port(name) == metrics_port + offset


def test_metrics_ports_with_and_without_offset() -> None:
    assert shipped().metrics_port("camera") == 9704
    assert shipped(port_offset=1000).metrics_port("camera") == 10704
    assert shipped(environ={"RDV_PORT_OFFSET": "20"}).metrics_port("gateway") == 9726


def test_ipc_path_limit(tmp_path: Path) -> None:
    sock = "/camera.sock"
    fill = MAX_IPC_PATH - len(str(tmp_path)) - 1 - len(sock)
    assert fill > 0, "tmp_path is too long for this test"
    at_limit = tmp_path / ("d" * fill)
    assert len(str(at_limit) + sock) == MAX_IPC_PATH
    assert shipped(run_dir=at_limit).endpoint("camera") == f"ipc://{at_limit}{sock}"
    over = tmp_path / ("d" * (fill + 1))
    with pytest.raises(BusConfigError) as info:
        shipped(run_dir=over).endpoint("camera")
    message = str(info.value)
    assert f"{MAX_IPC_PATH + 1} bytes" in message
    assert "RDV_RUN_DIR" in message and "RDV_BUS_TRANSPORT=tcp" in message
    # The same run dir is fine over tcp: no socket file there.
    assert shipped(run_dir=over, transport="tcp").endpoint("camera").startswith("tcp://")


def test_ipc_path_limit_counts_bytes_not_characters(tmp_path: Path) -> None:
    # "é" is two bytes in UTF-8: under the limit in characters, over it in bytes.
    sock = "/camera.sock"
    chars = (MAX_IPC_PATH - len(str(tmp_path)) - 1 - len(sock)) // 2 + 2
    run_dir = tmp_path / ("é" * chars)
    path = f"{run_dir}{sock}"
    assert len(path) <= MAX_IPC_PATH < len(path.encode())
    with pytest.raises(BusConfigError, match="over the"):
        shipped(run_dir=run_dir).endpoint("camera")


# --- overrides ------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    custom = write_map(tmp_path, edited("max_frame_bytes = 4096", "max_frame_bytes = 512"))
    environ = {
        "RDV_BUS_CONFIG": str(custom),
        "RDV_RUN_DIR": str(tmp_path / "run"),
        "RDV_BUS_TRANSPORT": "tcp",
        "RDV_PORT_OFFSET": "300",
    }
    bus = shipped(environ=environ)
    assert bus.path == custom
    assert bus.max_frame_bytes == 512
    assert bus.run_dir == tmp_path / "run"
    assert bus.transport == "tcp"
    assert bus.port_offset == 300
    assert bus.endpoint("leader_arm") == "tcp://127.0.0.1:6001"


def test_arguments_override_the_environment(tmp_path: Path) -> None:
    custom = write_map(tmp_path, edited("max_frame_bytes = 4096", "max_frame_bytes = 512"))
    environ = {
        "RDV_BUS_CONFIG": str(tmp_path / "missing.toml"),
        "RDV_RUN_DIR": str(tmp_path / "env-run"),
        "RDV_BUS_TRANSPORT": "tcp",
        "RDV_PORT_OFFSET": "300",
    }
    bus = load_bus_map(
        custom, run_dir=tmp_path / "arg-run", transport="ipc", port_offset=7, environ=environ
    )
    assert bus.path == custom and bus.max_frame_bytes == 512
    assert bus.run_dir == tmp_path / "arg-run"
    assert bus.transport == "ipc"
    assert bus.port_offset == 7
    assert bus.endpoint("camera") == f"ipc://{tmp_path}/arg-run/camera.sock"


def test_transport_in_the_file_is_used_without_overrides(tmp_path: Path) -> None:
    custom = write_map(tmp_path, edited('transport = "ipc"', 'transport = "tcp"'))
    assert load_bus_map(custom, environ={}).transport == "tcp"
    assert load_bus_map(custom, environ={"RDV_BUS_TRANSPORT": "ipc"}).transport == "ipc"


def test_explicit_environ_replaces_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RDV_BUS_TRANSPORT", "tcp")
    monkeypatch.setenv("RDV_PORT_OFFSET", "11")
    monkeypatch.setenv("RDV_RUN_DIR", str(tmp_path))
    from_process = load_bus_map()
    assert (from_process.transport, from_process.port_offset) == ("tcp", 11)
    assert from_process.run_dir == tmp_path
    isolated = load_bus_map(environ={})
    assert (isolated.transport, isolated.port_offset) == ("ipc", 0)
    assert isolated.run_dir == default_run_dir()


@pytest.mark.parametrize("value", ["abc", "1.5", ""])
def test_bad_port_offset_in_environment(value: str) -> None:
    with pytest.raises(BusConfigError, match=r"RDV_PORT_OFFSET and RDV_STATION_PORT_OFFSET"):
        shipped(environ={"RDV_PORT_OFFSET": value})
    with pytest.raises(BusConfigError, match=r"must be integers"):
        shipped(environ={"RDV_STATION_PORT_OFFSET": value})


def test_station_port_offset_adds_to_the_machine_offset() -> None:
    bus = shipped(environ={"RDV_PORT_OFFSET": "1000", "RDV_STATION_PORT_OFFSET": "100"})
    assert bus.port_offset == 1100
    assert bus.metrics_port("session_manager") == 9705 + 1100


@pytest.mark.parametrize("offset", [60000, -5702])
def test_port_offset_out_of_range(offset: int) -> None:
    with pytest.raises(BusConfigError, match=r"out of range"):
        shipped(port_offset=offset)


@pytest.mark.parametrize("transport", ["udp", "inproc", "TCP"])
def test_bad_transport_override(transport: str) -> None:
    with pytest.raises(BusConfigError, match=re.escape(repr(transport))):
        shipped(environ={"RDV_BUS_TRANSPORT": transport})
    with pytest.raises(BusConfigError, match="transport must be one of"):
        shipped(transport=transport)


# --- broken map files -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(BusConfigError, match="bus map not found") as info:
        load_bus_map(missing, environ={})
    assert str(missing) in str(info.value)
    with pytest.raises(BusConfigError, match="bus map not found"):
        load_bus_map(environ={"RDV_BUS_CONFIG": str(missing)})


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_map(tmp_path, SHIPPED + "\n[bus\nbroken = \n")
    with pytest.raises(BusConfigError, match="not valid TOML") as info:
        load_bus_map(path, environ={})
    assert str(path) in str(info.value)


def test_bad_transport_in_file(tmp_path: Path) -> None:
    path = write_map(tmp_path, edited('transport = "ipc"', 'transport = "carrier-pigeon"'))
    with pytest.raises(BusConfigError, match=r"transport must be one of .*'carrier-pigeon'"):
        load_bus_map(path, environ={})


def test_publisher_not_a_process(tmp_path: Path) -> None:
    path = write_map(tmp_path, edited('publishers = ["leader_arm"]', 'publishers = ["leader"]'))
    with pytest.raises(BusConfigError) as info:
        load_bus_map(path, environ={})
    message = str(info.value)
    assert "'joints.leader'" in message and "'leader'" in message and "not a process" in message


def test_unknown_schema(tmp_path: Path) -> None:
    path = write_map(tmp_path, edited('schema = "follower"', 'schema = "followr"'))
    with pytest.raises(BusConfigError, match=r"'joints.follower': schema must be one of"):
        load_bus_map(path, environ={})


@pytest.mark.parametrize(
    ("old", "new", "mentions"),
    [
        ("[bus]\n", "[buss]\n", "'bus'"),
        ("max_frame_bytes = 4096\n", "", "'max_frame_bytes'"),
        ("schema_version = 1\n", "", "'schema_version'"),
        ("bus_port = 5704\n", "", "'bus_port'"),
        ("max_video_bytes = 8_388_608", 'max_video_bytes = "lots"', "lots"),
        ("bus_port = 5701", 'bus_port = "fifty-seven"', "fifty-seven"),
        ('schema = "video"\n', "", "'schema'"),
    ],
)
def test_missing_or_mistyped_entries(tmp_path: Path, old: str, new: str, mentions: str) -> None:
    path = write_map(tmp_path, edited(old, new))
    with pytest.raises(BusConfigError, match="bad or missing entry") as info:
        load_bus_map(path, environ={})
    assert mentions in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "schema_version = 1\nprocesses = 5\ntopics = {}\n"
        "[bus]\nmax_frame_bytes = 1\nmax_video_bytes = 1\n",
        "schema_version = 1\nbus = 'ipc'\nprocesses = {}\ntopics = {}\n",
        "schema_version = 1\nprocesses = {}\ntopics = [1, 2]\n"
        "[bus]\nmax_frame_bytes = 1\nmax_video_bytes = 1\n",
        "",
    ],
    ids=["processes-not-a-table", "bus-not-a-table", "topics-not-a-table", "empty"],
)
def test_sections_of_the_wrong_type(tmp_path: Path, text: str) -> None:
    path = write_map(tmp_path, text)
    with pytest.raises(BusConfigError, match="bad or missing entry") as info:
        load_bus_map(path, environ={})
    assert str(path) in str(info.value)


def test_bus_config_error_is_a_value_error() -> None:
    assert issubclass(BusConfigError, ValueError)
    assert os.path.isabs(DEFAULT_BUS_CONFIG)
