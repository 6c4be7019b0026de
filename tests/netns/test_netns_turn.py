"""Both stations behind their own NAT, direct paths blocked: the session goes through TURN.

Topology (tests/support/netns_site.py, `nat=True, block_direct=True`): robot 10.1.0.2 and
teleop 10.2.0.2 on private subnets, each behind a NAT router namespace (iptables MASQUERADE)
on the public segment, where the broker and a coturn server (STUN + TURN, long-term
credentials) listen on 198.18.0.1. Each router drops its station's UDP to anything on the
segment but the TURN server, so neither host nor server-reflexive (hole-punched) pairs can
work. The gateways get the servers through the environment (RDV_ICE_SERVERS, RDV_ICE_USERNAME,
RDV_ICE_CREDENTIAL), as an operator gives them to deploy/*.conf.

Evidence the session is relayed, from three independent places: the routers' block rules
dropped the direct checks (they were tried); on both gateways the pair ICE settled on has an
end at a relayed address coturn allocated (aioice's own log lines); coturn's log shows those
allocations and permissions for the NATs' public addresses. Then the follower tracks the
leader within the clean link's bound (a relay on the same segment adds well under a tick).

Nothing here may touch the root namespace's network or leave a namespace, rule, server or
process behind (the Site removes them, failure or not).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.support.arm_checks import (
    TRACKING_BOUND,
    collect,
    tracking_errors,
    wait_for_state,
)
from tests.support.netns_site import PUBLIC_IP, Site
from tests.support.turn import RELAY_PORTS, allocations, selected_pair

pytestmark = pytest.mark.integration
SEGMENT = {"198.18.0.11", "198.18.0.12", PUBLIC_IP}  # the routers' public side and coturn


@pytest.fixture
def site() -> Iterator[Site]:
    natted = Site(nat=True, block_direct=True)
    natted.start()
    try:
        yield natted
    except BaseException:
        print(natted.logs())
        raise
    finally:
        natted.close()


def _log_time(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def connect_seconds(gateway_log: str) -> float | None:
    """From the last session's `connecting` to its `live`, as the gateway logged them."""
    connecting = [line for line in gateway_log.splitlines() if re.search(r": connecting \(", line)]
    live = [line for line in gateway_log.splitlines() if line.endswith(": live")]
    if not connecting or not live:
        return None
    return (_log_time(live[-1]) - _log_time(connecting[-1])).total_seconds()


def test_session_through_turn_when_both_stations_are_natted_and_direct_paths_blocked(
    site: Site,
) -> None:
    leader = site.subscribe("teleop", ["joints.leader"])
    follower = site.subscribe("robot", ["joints.follower"])
    try:
        t0 = time.monotonic()
        wait_for_state([leader, follower], "tracking", timeout_s=60)
        tracking_after_s = site.started_s + time.monotonic() - t0
        errors = tracking_errors(collect([leader, follower], 3.0))
    finally:
        leader.close()
        follower.close()

    logs = {
        name: (station.run_dir / "gateway.log").read_text()
        for name, station in site.stations.items()
    }
    relayed = {address for log in logs.values() for address in allocations(log)}
    pairs = {name: selected_pair(log) for name, log in logs.items()}
    blocked = [site.network.packets(rule) for rule in site.block_rules]
    assert site.turn is not None
    evidence = site.turn.relay_evidence()
    setup = {name: connect_seconds(log) for name, log in logs.items()}
    print(
        f"TURN: stations started -> tracking in {tracking_after_s:.1f} s; gateway connecting -> "
        f"live: teleop {setup['teleop']:.2f} s, robot {setup['robot']:.2f} s; pairs {pairs}; "
        f"direct UDP blocked at the NATs: {blocked} packets; coturn {evidence}; "
        f"tracking error max {max(errors, default=0):.2f} (bound {TRACKING_BOUND:.2f})"
    )

    assert all(count > 0 for count in blocked), "no direct check was tried: nothing was proven"
    assert relayed, "no gateway obtained a TURN allocation"
    for name, pair in pairs.items():
        assert pair is not None, f"{name}: no ICE pair completed"
        ends = set(pair)
        assert ends & relayed, f"{name}: the selected pair {pair} does not use a relayed address"
    assert all(
        host == PUBLIC_IP and RELAY_PORTS[0] <= port <= RELAY_PORTS[1] for host, port in relayed
    )
    assert evidence.allocations >= 2, evidence
    # coturn relays only to peers it holds a permission for: the far end of a relayed pair (a
    # NAT's public address, or the other relay) must be one of them.
    far: set[str] = set()
    for pair in pairs.values():
        assert pair is not None
        far |= {host for host, port in pair if (host, port) not in relayed and host in SEGMENT}
        far |= {PUBLIC_IP} if set(pair) <= relayed else set()
    assert far and far <= evidence.peers, f"relayed to {far}, coturn permitted {evidence}"
    assert len(errors) > 200, "too few follower frames to judge tracking"
    assert max(errors) <= TRACKING_BOUND, (max(errors), TRACKING_BOUND)
