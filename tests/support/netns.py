"""Network namespaces for tests: private segments, NAT routers, lossy links, all torn down.

`Network` builds a topology out of Linux network namespaces (`ip netns`), veth pairs, bridges
and iptables rules, runs processes inside them (`ip netns exec`, which execs: the pid held is
the process's own), and `close()` removes every one of them, failure or not: processes are
stopped by pid, each namespace must be empty of processes before it is deleted (an iptables
rule or veth lives and dies with its namespace), and the deletion is checked. Names carry this
process's pid and a counter, so parallel runs never clash.

`NetnsMosquitto` is tests/support/broker.py's Mosquitto, run inside one of these namespaces and
listening on that namespace's address. `call_in()` runs a Python function with its sockets
opened inside a namespace (a thread that enters it with setns(2)), which is how the test
process probes a broker or service that root's namespace cannot reach.

This module must never create an interface, address, route or rule outside the namespaces it
made, or signal a process it did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.cli import stop_supervisord as stop_process
from tests.support.broker import Mosquitto, _accepts

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_STOP_GRACE_S = 10.0
_counter = itertools.count()
T = TypeVar("T")


class NetnsError(RuntimeError):
    """A topology command failed (the message carries the command and its stderr)."""


def tool(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def unavailable_reason() -> str | None:
    """Why this system forbids the namespaces tests need (None: it allows them).

    Probes by doing it: a namespace with a veth inside, an iptables statistic rule and a NAT
    (MASQUERADE) rule, then deletes it. Only a refusal by the system is a reason (not root, or
    the kernel says no); missing tools raise, since scripts/setup.sh installs them and a skip
    would hide that.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    missing = [name for name in ("ip", "iptables", "iptables-save") if tool(name) is None]
    if missing:
        raise RuntimeError(
            f"not installed: {', '.join(missing)} (scripts/setup.sh installs iproute2 iptables)"
        )
    probe = Network()
    try:
        ns = probe.namespace("probe")
        probe.veth(ns, ns)
        probe.iptables(ns, "-A", "INPUT", "-m", "statistic", "--mode", "random",
                       "--probability", "0.5", "-j", "DROP")  # fmt: skip
        probe.iptables(ns, "-A", "POSTROUTING", "-j", "MASQUERADE", table="nat")
    except NetnsError as exc:
        return f"the kernel refused a network namespace, veth or iptables rule: {exc}"
    finally:
        probe.close()
    return None


def _run(argv: list[str], timeout_s: float = 30.0) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """fn() run on a thread that has entered namespace `ns`: sockets it opens live there.

    setns(2) with CLONE_NEWNET moves only the calling thread, which ends when fn returns; the
    rest of the test process stays in its own namespace.
    """
    outcome: dict[str, object] = {}

    def enter_and_run() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_run, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


@dataclass(frozen=True)
class Rule:
    """One iptables rule in one namespace, tagged with a unique comment to find its counters."""

    ns: str
    table: str
    chain: str
    spec: tuple[str, ...]
    tag: str


class Network:
    """Namespaces, links, rules and processes of one test; `close()` removes them all."""

    def __init__(self) -> None:
        self.id = f"{os.getpid()}{next(_counter)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._links = itertools.count()
        self._rules = itertools.count()
        self.ip = tool("ip") or "ip"
        self.iptables_tool = tool("iptables") or "iptables"

    # --- building ------------------------------------------------------------------------

    def namespace(self, role: str) -> str:
        """A new namespace named rdv-<role>-<pid><n>, loopback up, IPv6 off (IPv4 topology)."""
        name = f"rdv-{role}-{self.id}"
        _run([self.ip, "netns", "add", name])
        self.namespaces.append(name)  # recorded first: close() deletes it whatever fails next
        _run([self.ip, "-n", name, "link", "set", "lo", "up"])
        self.sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
        self.sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")
        return name

    def sysctl(self, ns: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        # /proc/sys/net is per namespace: written from inside it.
        self.exec(ns, ["sh", "-c", f"echo {value} > {path}"])

    def exec(self, ns: str, argv: list[str], timeout_s: float = 30.0) -> str:
        """Run a short command inside `ns`, wait for it; its stdout (raises on failure)."""
        return _run([self.ip, "netns", "exec", ns, *argv], timeout_s)

    def bridge(self, ns: str, address: str | None = None) -> str:
        """A bridge inside `ns` (a switch for a segment), up, optionally with `address`/prefix."""
        name = f"br{next(self._links)}"
        _run([self.ip, "-n", ns, "link", "add", name, "type", "bridge"])
        if address:
            _run([self.ip, "-n", ns, "addr", "add", address, "dev", name])
        _run([self.ip, "-n", ns, "link", "set", name, "up"])
        return name

    def veth(
        self,
        ns_a: str,
        ns_b: str,
        address_a: str | None = None,
        address_b: str | None = None,
        *,
        bridge_b: str | None = None,
    ) -> tuple[str, str]:
        """A veth pair between two namespaces (created in them, never in root's), both ends up.

        `bridge_b` plugs the b end into a bridge of ns_b instead of giving it an address.
        Returns the interface names (a, b).
        """
        n = next(self._links)
        end_a, end_b = f"va{n}-{self.id}"[:15], f"vb{n}-{self.id}"[:15]
        _run([self.ip, "link", "add", end_a, "netns", ns_a, "type", "veth",
              "peer", "name", end_b, "netns", ns_b])  # fmt: skip
        for ns, end, address in ((ns_a, end_a, address_a), (ns_b, end_b, address_b)):
            if address:
                _run([self.ip, "-n", ns, "addr", "add", address, "dev", end])
        if bridge_b:
            _run([self.ip, "-n", ns_b, "link", "set", end_b, "master", bridge_b])
        for ns, end in ((ns_a, end_a), (ns_b, end_b)):
            _run([self.ip, "-n", ns, "link", "set", end, "up"])
        return end_a, end_b

    def route(self, ns: str, *spec: str) -> None:
        _run([self.ip, "-n", ns, "route", "add", *spec])

    def iptables(self, ns: str, *args: str, table: str = "filter") -> Rule:
        """Append a rule (`-A CHAIN match... -j TARGET`) in `ns`; delete() or close() removes it."""
        if len(args) < 2 or args[0] != "-A":
            raise ValueError("give the rule as -A CHAIN ...")
        tag = f"rdv-{self.id}-{next(self._rules)}"
        chain, spec = args[1], (*args[2:], "-m", "comment", "--comment", tag)
        self.exec(ns, [self.iptables_tool, "-w", "-t", table, "-A", chain, *spec])
        return Rule(ns, table, chain, tuple(spec), tag)

    def delete(self, rule: Rule) -> None:
        self.exec(rule.ns, [self.iptables_tool, "-w", "-t", rule.table, "-D", rule.chain,
                            *rule.spec])  # fmt: skip

    def packets(self, rule: Rule) -> int:
        """How many packets the rule has matched so far."""
        save = tool("iptables-save") or "iptables-save"
        saved = self.exec(rule.ns, [save, "-c", "-t", rule.table])
        for line in saved.splitlines():
            if f'"{rule.tag}"' in line or f" {rule.tag} " in f"{line} ":
                match = re.match(r"\[(\d+):\d+\]", line)
                if match:
                    return int(match.group(1))
        raise NetnsError(f"rule {rule.tag} not found in {rule.ns}:\n{saved}")

    # --- processes --------------------------------------------------------------------------

    def prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a command inside `ns` (`ip netns exec` execs it: same pid)."""
        return [self.ip, "netns", "exec", ns]

    def spawn(self, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        """Start a long-running process inside `ns`, output to `log`; stopped by close()."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [*self.prefix(ns), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM, then SIGKILL after a grace period; reaped. Only processes spawn() made."""
        stop_process(process, _STOP_GRACE_S)  # rdv's own (written for supervisord, generic)

    def pids_in(self, ns: str) -> list[int]:
        """Processes living in `ns` (all of them started by this test, since it made `ns`)."""
        out = _run([self.ip, "netns", "pids", ns])
        return [int(word) for word in out.split()]

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete every namespace (with its veths and rules), check both.

        Raises NetnsError naming what was left behind, after having removed it anyway.
        """
        for process in reversed(self.processes):
            self.stop(process)
        self.processes.clear()
        leaks: list[str] = []
        for ns in reversed(self.namespaces):
            if not (NETNS_DIR / ns).exists():
                continue
            stray = self._reap_strays(ns)
            if stray:
                leaks.append(f"{ns}: processes {stray} still running (killed)")
            try:
                _run([self.ip, "netns", "del", ns])
            except NetnsError as exc:
                leaks.append(str(exc))
            if (NETNS_DIR / ns).exists():
                leaks.append(f"{ns} still exists")
        self.namespaces.clear()
        if leaks:
            raise NetnsError("left behind: " + "; ".join(leaks))

    def _reap_strays(self, ns: str) -> list[int]:
        """Kill what still lives in a namespace this made (a child a stopped parent orphaned)."""
        try:
            stray = self.pids_in(ns)
        except NetnsError:
            return []
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.pids_in(ns):
            time.sleep(0.05)
        return stray

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NetnsMosquitto(Mosquitto):
    """Mosquitto run inside namespace `ns`, listening on `host` there (anonymous clients).

    It listens only on the test's own segment, which nothing outside the test can reach.
    """

    def __init__(self, network: Network, ns: str, host: str) -> None:
        super().__init__()
        self.network = network
        self.ns = ns
        self.host = host

    def _command(self, directory: Path) -> tuple[list[str], Path, dict[str, str] | None]:
        argv, cwd, env = super()._command(directory)
        return [*self.network.prefix(self.ns), *argv], cwd, env

    def _accepting(self) -> bool:
        return call_in(self.ns, lambda: _accepts(self.host, self.port))
