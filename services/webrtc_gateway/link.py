"""Link health over the reliable `state` channel: ping/pong, RTT, loss and clock offset.

Pure logic, times passed in (ns, each side's own wall clock), no I/O. aiortc only notices a
dead peer after ICE consent fails (~30 s); this declares the link lost after `lost_after_s`
(500 ms) without a pong. The offset estimate is NTP's: for a ping sent at t1 (ours), received at
t2 and answered at t3 (theirs), and the pong received at t4 (ours),
offset = ((t2 - t1) + (t3 - t4)) / 2 (their clock minus ours) and rtt = (t4 - t1) - (t3 - t2).
The sample with the smallest RTT in a sliding window has the least queueing asymmetry, so it
gives the offset. This module must never report a link alive on stale evidence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

PING_INTERVAL_S = 0.1
LOST_AFTER_S = 0.5
OFFSET_WINDOW = 50  # samples: 5 s at 10 Hz
# A new link first pings this many times this fast, so the offset estimate (and with it the
# age of every command) rests on many samples from its first fraction of a second, not on a few.
WARMUP_PINGS = 20
WARMUP_INTERVAL_S = 0.01


@dataclass(frozen=True)
class Sample:
    rtt_ns: int
    offset_ns: int  # peer clock minus ours


class ClockOffset:
    """Their wall clock minus ours, from the minimum-RTT sample of the recent window."""

    def __init__(self, window: int = OFFSET_WINDOW) -> None:
        self._samples: deque[Sample] = deque(maxlen=window)

    def add(self, t1: int, t2: int, t3: int, t4: int) -> Sample | None:
        """Record one exchange; None if its times are impossible (and it is not used)."""
        rtt = (t4 - t1) - (t3 - t2)
        if t4 < t1 or t3 < t2 or rtt < 0:
            return None
        sample = Sample(rtt, ((t2 - t1) + (t3 - t4)) // 2)
        self._samples.append(sample)
        return sample

    @property
    def best(self) -> Sample | None:
        return min(self._samples, key=lambda s: s.rtt_ns) if self._samples else None

    @property
    def offset_ns(self) -> int | None:
        best = self.best
        return None if best is None else best.offset_ns

    def to_local(self, peer_time_ns: int) -> int | None:
        """A time stamped by the peer, expressed on our clock."""
        offset = self.offset_ns
        return None if offset is None else peer_time_ns - offset


class LinkMonitor:
    """Decides when to ping and whether the link is alive, from pongs received."""

    def __init__(
        self,
        now_ns: int,
        *,
        ping_interval_s: float = PING_INTERVAL_S,
        lost_after_s: float = LOST_AFTER_S,
        warmup_pings: int = WARMUP_PINGS,
    ) -> None:
        if not 0 < ping_interval_s < lost_after_s:
            raise ValueError("ping_interval_s must be positive and below lost_after_s")
        self.ping_interval_ns = int(ping_interval_s * 1e9)
        self.warmup_interval_ns = int(min(WARMUP_INTERVAL_S, ping_interval_s) * 1e9)
        self.warmup_pings = warmup_pings
        self.lost_after_ns = int(lost_after_s * 1e9)
        self.offset = ClockOffset()
        self.rtt_ns: int | None = None
        self._started_ns = now_ns
        self._last_pong_ns: int | None = None
        self._next_ping_ns = now_ns
        self._next_id = 0
        self._pending: dict[int, int] = {}  # ping id -> t1

    def ping_due(self, now_ns: int) -> tuple[int, int] | None:
        """(ping id, t1) when a ping should go out now, else None."""
        if now_ns < self._next_ping_ns:
            return None
        warming = self._next_id < self.warmup_pings
        interval_ns = self.warmup_interval_ns if warming else self.ping_interval_ns
        self._next_ping_ns = now_ns + interval_ns
        ping_id = self._next_id
        self._next_id += 1
        self._pending[ping_id] = now_ns
        # Pings older than the loss horizon can no longer prove anything: forget them.
        horizon = now_ns - self.lost_after_ns
        for old in [i for i, t1 in self._pending.items() if t1 < horizon]:
            del self._pending[old]
        return ping_id, now_ns

    def on_pong(self, ping_id: int, t2: int, t3: int, now_ns: int) -> Sample | None:
        """A pong for one of our pings; unknown or expired ids are ignored."""
        t1 = self._pending.pop(ping_id, None)
        if t1 is None:
            return None
        sample = self.offset.add(t1, t2, t3, now_ns)
        if sample is not None:
            self.rtt_ns = sample.rtt_ns
            self._last_pong_ns = now_ns
        return sample

    def alive(self, now_ns: int) -> bool:
        """A pong within the loss horizon; a new link gets one horizon to answer its first."""
        last = self._started_ns if self._last_pong_ns is None else self._last_pong_ns
        return now_ns - last <= self.lost_after_ns

    @property
    def answered(self) -> bool:
        return self._last_pong_ns is not None
