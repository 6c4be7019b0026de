"""The namespace support removes everything it made, also when a test fails halfway.

What the other netns tests rely on for "leave nothing behind": processes started in a
namespace are stopped by pid, a process that escaped its parent is found in the namespace,
killed and reported, and every namespace (with its veths and iptables rules) is deleted.
These tests must never signal a process outside the namespaces they made.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.netns import NETNS_DIR, NetnsError, Network, tool
from tests.support.rendezvous import wait_until

pytestmark = pytest.mark.integration


def test_everything_is_removed_when_the_test_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Network() as net:
        a, b = net.namespace("a"), net.namespace("b")
        end_a, end_b = net.veth(a, b, "198.18.9.1/24", "198.18.9.2/24")
        rule = net.iptables(a, "-A", "INPUT", "-i", end_a, "-j", "DROP")
        assert net.packets(rule) == 0
        process = net.spawn(b, ["sleep", "60"], tmp_path / "sleep.log")
        # `ip netns exec` enters the namespace, then execs: the pid there is sleep's own.
        assert wait_until(lambda: net.pids_in(b) == [process.pid], timeout_s=10)
        made = list(net.namespaces)
        raise RuntimeError("the test failed")
    assert process.poll() is not None
    assert not [ns for ns in made if (NETNS_DIR / ns).exists()]
    links = subprocess.run(
        [tool("ip") or "ip", "-o", "link"], capture_output=True, text=True
    ).stdout
    assert end_a not in links and end_b not in links  # never in root's namespace either


def test_a_process_left_in_a_namespace_is_killed_and_reported() -> None:
    net = Network()
    try:
        ns = net.namespace("stray")
        net.exec(ns, ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])  # outlives its parent
        stray = net.pids_in(ns)
        assert len(stray) == 1
    finally:
        with pytest.raises(NetnsError, match="still running"):
            net.close()
    assert not Path(f"/proc/{stray[0]}").exists() or _zombie(stray[0])
    assert not (NETNS_DIR / ns).exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
