"""A real coturn TURN server (Debian `coturn`) for tests, run inside a test's network namespace.

Started from its own config file in its own temp dir (`rdv-turn-*`): long-term credentials for
one user, UDP/TCP on `address:3478`, relay ports on the same address, no TLS, no CLI, its user
database in the temp dir; the Debian system service and its files are never used. Ready once it
answers a STUN binding request. `stop()` ends exactly the process started (by pid) and removes
the dir. `relay_evidence()` reads its log for allocations and permissions: what shows a relayed
session actually went through it.

This module must never touch the system coturn service or its files (/etc/turnserver.conf,
/var/lib/turn), or listen outside the namespace it was given.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aioice import stun

from tests.support.netns import Network, call_in, tool

PORT = 3478
RELAY_PORTS = (49152, 49407)
REALM = "rdv.test"


@dataclass(frozen=True)
class RelayEvidence:
    allocations: int  # successful ALLOCATEs
    permissions: int  # successful CREATE_PERMISSION / CHANNEL_BIND
    peers: set[str]  # peer addresses permissions were created for


class TurnServer:
    def __init__(self, network: Network, ns: str, address: str) -> None:
        self.network = network
        self.ns = ns
        self.address = address
        self.username = "rdv"
        self.password = secrets.token_hex(8)
        self.dir = Path(tempfile.mkdtemp(prefix="rdv-turn-"))
        self.log_path = self.dir / "turn.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"turn:{self.address}:{PORT}?transport=udp"

    @property
    def stun_url(self) -> str:
        return f"stun:{self.address}:{PORT}"

    def start(self, timeout_s: float = 20.0) -> None:
        turnserver = tool("turnserver")
        if turnserver is None:
            raise RuntimeError("turnserver not found (Debian: apt-get install coturn)")
        config = self.dir / "turnserver.conf"
        config.write_text(
            "\n".join(
                [
                    "# Written by tests/support/turn.py for one test.",
                    f"listening-ip={self.address}",
                    f"relay-ip={self.address}",
                    f"listening-port={PORT}",
                    f"min-port={RELAY_PORTS[0]}",
                    f"max-port={RELAY_PORTS[1]}",
                    "lt-cred-mech",
                    f"user={self.username}:{self.password}",
                    f"realm={REALM}",
                    f"userdb={self.dir / 'turndb'}",  # never the system's /var/lib/turn
                    # As coturn's security notes advise: never relay into private networks.
                    "denied-peer-ip=10.0.0.0-10.255.255.255",
                    "denied-peer-ip=172.16.0.0-172.31.255.255",
                    "denied-peer-ip=192.168.0.0-192.168.255.255",
                    "no-tls",
                    "no-dtls",
                    "no-cli",
                    "no-software-attribute",
                    "simple-log",
                    f"log-file={self.log_path}",
                    f"pidfile={self.dir / 'turn.pid'}",
                    "verbose",
                ]
            )
            + "\n"
        )
        self.process = self.network.spawn(
            self.ns, [turnserver, "-c", str(config)], self.dir / "stdout.log", env=dict(os.environ)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"turnserver exited on start:\n{self.log_text()}")
            if call_in(self.ns, self._answers_stun):
                return
            time.sleep(0.1)
        raise RuntimeError(f"turnserver silent for {timeout_s} s:\n{self.log_text()}")

    def _answers_stun(self) -> bool:
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            try:
                probe.sendto(bytes(request), (self.address, PORT))
                data, _ = probe.recvfrom(2048)
            except OSError:
                return False
        try:
            answer = stun.parse_message(data)
        except ValueError:
            return False
        return answer.transaction_id == request.transaction_id

    def log_text(self, tail: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def relay_evidence(self) -> RelayEvidence:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        allocations = len(re.findall(r"ALLOCATE processed, success", text))
        permissions = len(re.findall(r"(CREATE_PERMISSION|CHANNEL_BIND) processed, success", text))
        peers = set(re.findall(r"peer (\d+\.\d+\.\d+\.\d+)(?::\d+)? lifetime updated", text))
        return RelayEvidence(allocations, permissions, peers)

    def stop(self) -> None:
        if self.process is not None:
            self.network.stop(self.process)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --- what aioice logs (INFO, in each gateway's log) ------------------------------------------

Address = tuple[str, int]
_ADDRESS = r"\('([\d.]+)', (\d+)\)"
_ALLOCATED = re.compile(rf"TURN allocation created {_ADDRESS}")
_SUCCEEDED = re.compile(
    rf"Connection\((\d+)\) Check CandidatePair\({_ADDRESS} -> {_ADDRESS}\) "
    r"State\.IN_PROGRESS -> State\.SUCCEEDED"
)
_COMPLETED = re.compile(r"Connection\((\d+)\) ICE completed")


def allocations(gateway_log: str) -> list[Address]:
    """Relayed addresses the gateway obtained from its TURN server, oldest first."""
    return [(host, int(port)) for host, port in _ALLOCATED.findall(gateway_log)]


def selected_pair(gateway_log: str) -> tuple[Address, Address] | None:
    """(local, remote) of the pair the last completed ICE connection settled on, or None.

    aioice completes a connection when its first pair is nominated, and the nominated pair is
    the one whose check succeeded last before "ICE completed" on that connection.
    """
    last: dict[str, tuple[Address, Address]] = {}
    chosen = None
    for line in gateway_log.splitlines():
        if match := _SUCCEEDED.search(line):
            conn, lhost, lport, rhost, rport = match.groups()
            last[conn] = ((lhost, int(lport)), (rhost, int(rport)))
        elif (match := _COMPLETED.search(line)) and match.group(1) in last:
            chosen = last[match.group(1)]
    return chosen
