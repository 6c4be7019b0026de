"""Link health logic of the WebRTC gateway: ping schedule, loss at 500 ms, NTP-style offset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.webrtc_gateway.link import ClockOffset, LinkMonitor

MS = 1_000_000


def exchange(monitor: LinkMonitor, now: int, offset: int, up: int, down: int, hold: int = 0):
    """One ping/pong with one-way delays up/down, the peer's clock ahead by offset."""
    due = monitor.ping_due(now)
    assert due is not None
    ping_id, t1 = due
    t2 = t1 + up + offset
    t3 = t2 + hold
    t4 = t3 - offset + down
    return monitor.on_pong(ping_id, t2, t3, t4), t4


def test_offset_and_rtt_with_symmetric_delays_are_exact() -> None:
    monitor = LinkMonitor(0)
    sample, _ = exchange(monitor, 0, offset=7 * MS, up=2 * MS, down=2 * MS, hold=1 * MS)
    assert sample is not None
    assert sample.rtt_ns == 4 * MS and sample.offset_ns == 7 * MS
    assert monitor.offset.to_local(100 * MS) == 93 * MS


def test_minimum_rtt_sample_wins_over_asymmetric_queueing() -> None:
    monitor = LinkMonitor(0)
    now = 0
    # Queueing on the way up only: each such sample is off by half its extra delay.
    for up in (30 * MS, 20 * MS, 1 * MS, 25 * MS):
        _, now = exchange(monitor, now + 100 * MS, offset=-5 * MS, up=up, down=1 * MS)
    assert monitor.offset.best.rtt_ns == 2 * MS
    assert monitor.offset.offset_ns == -5 * MS


@given(
    offset=st.integers(-(10**12), 10**12),
    base=st.integers(0, 5 * MS),
    extra=st.lists(st.integers(0, 50 * MS), min_size=1, max_size=30),
)
def test_estimate_error_is_bounded_by_half_the_best_extra_delay(offset, base, extra) -> None:
    """With one-way delays base+e (up) and base (down), |error| <= min(e)/2."""
    estimator = ClockOffset()
    t = 0
    for e in extra:
        t1 = t
        t2 = t1 + base + e + offset
        t4 = t2 - offset + base
        estimator.add(t1, t2, t2, t4)
        t = t4 + 100 * MS
    assert abs(estimator.offset_ns - offset) <= min(extra) // 2 + 1


def test_link_is_lost_500_ms_after_the_last_pong_and_not_before() -> None:
    monitor = LinkMonitor(0)
    _, t = exchange(monitor, 0, offset=0, up=MS, down=MS)
    assert monitor.alive(t + 500 * MS)
    assert not monitor.alive(t + 501 * MS)


def test_a_new_link_gets_one_horizon_for_its_first_pong() -> None:
    monitor = LinkMonitor(1000 * MS)
    assert monitor.alive(1500 * MS) and not monitor.answered
    assert not monitor.alive(1501 * MS)


def test_pings_are_spaced_by_the_interval() -> None:
    monitor = LinkMonitor(0, ping_interval_s=0.1, warmup_pings=0)
    assert monitor.ping_due(0) is not None
    assert monitor.ping_due(99 * MS) is None
    assert monitor.ping_due(100 * MS) is not None


def test_a_new_link_warms_the_offset_estimate_with_a_burst_of_pings() -> None:
    monitor = LinkMonitor(0, ping_interval_s=0.1, warmup_pings=20)
    sent = [t for t in range(0, 400 * MS, MS) if monitor.ping_due(t) is not None]
    assert sent[:20] == [i * 10 * MS for i in range(20)]  # 20 pings 10 ms apart
    assert sent[20:] == [200 * MS, 300 * MS]  # then the normal interval


def test_unknown_duplicate_and_expired_pongs_prove_nothing() -> None:
    monitor = LinkMonitor(0)
    ping_id, t1 = monitor.ping_due(0)
    assert monitor.on_pong(ping_id + 99, t1, t1, MS) is None
    assert monitor.on_pong(ping_id, t1 + MS, t1 + MS, 2 * MS) is not None
    assert monitor.on_pong(ping_id, t1 + MS, t1 + MS, 3 * MS) is None  # duplicate
    old_id, _ = monitor.ping_due(100 * MS)
    monitor.ping_due(700 * MS)  # forgets pings older than the loss horizon
    assert monitor.on_pong(old_id, 0, 0, 701 * MS) is None
    assert not monitor.alive(701 * MS)  # the stale pong did not revive the link


def test_impossible_times_are_not_used() -> None:
    estimator = ClockOffset()
    assert estimator.add(10, 5, 4, 20) is None  # answered before received
    assert estimator.add(10, 5, 5, 9) is None  # received back before sent
    assert estimator.offset_ns is None


def test_ping_interval_must_be_below_the_loss_horizon() -> None:
    with pytest.raises(ValueError):
        LinkMonitor(0, ping_interval_s=0.5, lost_after_s=0.5)
