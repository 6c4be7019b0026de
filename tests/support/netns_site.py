"""Robot and teleop stations on separate network namespaces, meeting on a "public" segment.

`Site` builds, with tests/support/netns.py:

- a public namespace holding a bridge (the segment) at 198.18.0.1/24, with the MQTT broker
  (Mosquitto) on it and, for `nat=True`, a coturn TURN/STUN server on the same address;
- `nat=False`: the robot and teleop namespaces plugged straight into the segment (198.18.0.10,
  198.18.0.20); their veth is "the link" that loss is applied to;
- `nat=True`: each station on its own private subnet (10.1.0.2, 10.2.0.2) behind its own NAT
  router namespace (198.18.0.11, 198.18.0.12; iptables MASQUERADE). With `block_direct`, each
  router drops the station's UDP to anything on the segment but the TURN server, so no direct
  path between the stations exists (the rules are kept to read their counters).

The stations are deploy/robot.conf and deploy/teleop.conf, unchanged, under real supervisord
(`Station`), each run inside its namespace; identities as `rdv demo` prepares them, pointing at
the segment's broker. 198.18.0.0/15 is the range RFC 2544 sets aside for benchmarks: never routed.
`close()` stops the stations, the servers, then removes every namespace (veths, rules with it).
This module must never put anything in the root namespace.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from services.bus import Subscriber
from services.demo import prepare_demo_identities
from tests.support.netns import NetnsMosquitto, Network, Rule
from tests.support.station import Station
from tests.support.turn import TurnServer

PUBLIC_IP = "198.18.0.1"
ROBOT_PROGRAMS = ["follower_arm", "session_manager", "gateway"]
TELEOP_PROGRAMS = ["leader_arm", "session_manager", "gateway"]


class Site:
    def __init__(self, *, nat: bool = False, block_direct: bool = False) -> None:
        self.nat = nat
        self.block_direct = block_direct
        self.network = Network()
        self.broker: NetnsMosquitto | None = None
        self.turn: TurnServer | None = None
        self.stations: dict[str, Station] = {}
        self.namespaces: dict[str, str] = {}
        self.links: dict[str, str] = {}  # station -> its interface toward the segment
        self.block_rules: list[Rule] = []
        self.dir = Path(tempfile.mkdtemp(prefix="rdv-site-"))
        self.started_s = 0.0  # start(): topology, servers and both stations up (not paired)

    # --- building ---------------------------------------------------------------------------

    def start(self) -> None:
        """Build the topology, start broker (and TURN), then both stations; close() on failure."""
        began = time.monotonic()
        try:
            self._build()
            self.broker = NetnsMosquitto(self.network, self.namespaces["public"], PUBLIC_IP)
            self.broker.start()
            env: dict[str, str] = {"RDV_MQTT_VERSION": "5"}
            if self.nat:
                self.turn = TurnServer(self.network, self.namespaces["public"], PUBLIC_IP)
                self.turn.start()
                env.update(
                    RDV_ICE_SERVERS=f"{self.turn.stun_url},{self.turn.url}",
                    RDV_ICE_USERNAME=self.turn.username,
                    RDV_ICE_CREDENTIAL=self.turn.password,
                )
            prepare_demo_identities(self.dir, self.broker.url)
            for name, conf, programs in (
                ("robot", "robot.conf", ROBOT_PROGRAMS),
                ("teleop", "teleop.conf", TELEOP_PROGRAMS),
            ):
                station = Station(
                    conf,
                    env={**env, "RDV_CONFIG_DIR": str(self.dir / name / "config")},
                    prefix=self.network.prefix(self.namespaces[name]),
                )
                self.stations[name] = station
                station.start(programs)
            self.started_s = time.monotonic() - began
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        net = self.network
        public = self.namespaces["public"] = net.namespace("pub")
        segment = net.bridge(public, f"{PUBLIC_IP}/24")
        for index, name in enumerate(("robot", "teleop"), start=1):
            ns = self.namespaces[name] = net.namespace(name[:3])
            if not self.nat:
                address = f"198.18.0.{index}0/24"
                self.links[name], _ = net.veth(ns, public, address, bridge_b=segment)
                continue
            router = self.namespaces[f"{name}-nat"] = net.namespace(f"{name[:3]}nat")
            outside, _ = net.veth(router, public, f"198.18.0.1{index}/24", bridge_b=segment)
            inside, self.links[name] = net.veth(
                router, ns, f"10.{index}.0.1/24", f"10.{index}.0.2/24"
            )
            net.route(ns, "default", "via", f"10.{index}.0.1")
            net.sysctl(router, "net.ipv4.ip_forward", "1")
            net.iptables(
                router, "-A", "POSTROUTING", "-o", outside, "-j", "MASQUERADE", table="nat"
            )
            if self.block_direct:
                # Only the TURN server (and the broker's TCP) is reachable: no direct UDP path.
                block = ("-i", inside, "-o", outside, "-p", "udp", "!", "-d", PUBLIC_IP)
                self.block_rules.append(net.iptables(router, "-A", "FORWARD", *block, "-j", "DROP"))

    # --- reading ----------------------------------------------------------------------------

    def subscribe(self, station: str, topics: list[str]) -> Subscriber:
        """A subscriber on a station's bus (ipc sockets in its run dir: reachable from here)."""
        return Subscriber(self.stations[station].bus, topics)

    def logs(self) -> str:
        parts = [f"=== {name}\n{station.logs()}" for name, station in self.stations.items()]
        if self.turn is not None:
            parts.append(f"=== turnserver\n{self.turn.log_text(4000)}")
        if self.broker is not None:
            parts.append(f"=== broker\n{self.broker.log_text(2000)}")
        return "\n".join(parts)

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything, each step attempted whatever failed before; the first error raised."""
        errors: list[BaseException] = []
        steps = [station.stop for station in self.stations.values()]
        if self.turn is not None:
            steps.append(self.turn.stop)
        if self.broker is not None:
            steps.append(self.broker.stop)
        steps.append(self.network.close)
        for step in steps:
            try:
                step()
            except BaseException as exc:  # keep tearing down; report after
                errors.append(exc)
        self.stations.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]
