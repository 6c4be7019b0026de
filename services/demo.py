"""Prepares the demo's two station identities: owner "demo", each trusting the other.

`rdv demo` calls this before starting deploy/demo.conf. It writes only under the demo's run
directory and must never touch the user's own identity in ~/.config/rdv.
"""

from __future__ import annotations

from pathlib import Path

from services.session_manager.identity import Identity, TrustRoster, register

DEMO_OWNER = "demo"
DEMO_STATIONS = {"robot": "demo-robot", "teleop": "demo-teleop"}


def prepare_demo_identities(run_dir: Path, broker_url: str) -> dict[str, Identity]:
    """Create (or update to this broker) the demo identities and their mutual trust."""
    identities = {}
    for station, station_id in DEMO_STATIONS.items():
        identity, _ = register(
            run_dir / station / "config",
            owner=DEMO_OWNER,
            broker_url=broker_url,
            station_id=station_id,
            role_hint=station,
        )
        identities[station] = identity
    for station, identity in identities.items():
        roster = TrustRoster.load(run_dir / station / "config")
        for other in identities.values():
            if other.station_id != identity.station_id:
                roster.add(other.station_id, other.public_key_b64, replace=True)
    return identities
