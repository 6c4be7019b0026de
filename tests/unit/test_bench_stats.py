"""The arithmetic behind `rdv bench` figures: percentiles, matching commands sent to commands
applied, histogram quantiles from Prometheus buckets, and the machine print-out."""

from __future__ import annotations

import math

import pytest

from bench.common import CpuWindow, machine_info, percentile
from bench.control import Figures, histogram_delta, histogram_quantile, match


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_match_counts_each_command_once_and_skips_the_warm_up() -> None:
    ms = 1_000_000
    sent = [(seq, 1_000 * ms + seq * 10 * ms) for seq in range(10)]  # 100 Hz, from t = 1 s
    applied = [(seq, t, t + 2 * ms) for seq, t in sent if seq != 7]  # seq 7 lost
    applied.append((3, sent[3][1], sent[3][1] + 50 * ms))  # a duplicate is not a second sample
    figures = match(sent, applied, warmup_s=0.02)  # seq 0 and 1 fall in the warm-up
    assert figures.sent == 8
    assert figures.applied == 7
    assert figures.latencies_ms == pytest.approx([2.0] * 7)
    summary = figures.summary()
    assert summary["loss"] == pytest.approx(1 / 8, abs=1e-4)
    assert summary["p50"] == summary["max"] == pytest.approx(2.0)


def test_loss_counts_rejections_and_stays_within_zero_and_one() -> None:
    assert Figures([1.0], sent=4, applied=4, rejected=1).summary()["loss"] == 0.25
    assert Figures([1.0], sent=1, applied=1, rejected=5).summary()["loss"] == 1.0
    empty = Figures([], sent=0, applied=0).summary()
    assert empty == {"p50": None, "p99": None, "max": None, "loss": None}


def test_histogram_quantile_follows_prometheus() -> None:
    buckets = [(0.001, 50.0), (0.002, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.0015)
    assert histogram_quantile(0.5, [(0.001, 0.0), (math.inf, 0.0)]) is None


def test_histogram_delta_uses_only_the_window() -> None:
    name = "rdv_control_latency_seconds"

    def scrape(le_1_5: float, le_3: float, total: float, seconds: float) -> dict[str, float]:
        return {
            f"{name}_bucket{{le=0.0015}}": le_1_5,
            f"{name}_bucket{{le=0.003}}": le_3,
            f"{name}_bucket{{le=+Inf}}": total,
            f"{name}_count": total,
            f"{name}_sum": seconds,
        }

    before, after = scrape(10, 10, 10, 1.0), scrape(70, 109, 110, 1.15)
    delta = histogram_delta(before, after, name)
    assert delta["count"] == 100
    assert delta["mean_ms"] == pytest.approx(1.5)
    assert delta["share_le_1_5ms"] == pytest.approx(0.6)
    assert delta["share_le_3ms"] == pytest.approx(0.99)


def test_machine_info_names_cores_python_and_libraries() -> None:
    info = machine_info(mosquitto="2.0.11")
    assert info["cores"] >= 1
    assert info["python"].count(".") == 2
    assert info["libraries"]["pyzmq"] and info["libraries"]["libzmq"]
    assert info["mosquitto"] == "2.0.11"
    assert info["cpu_busy_at_start"] is None or 0.0 <= info["cpu_busy_at_start"] <= 1.0


def test_cpu_window_reports_shares() -> None:
    import os

    window = CpuWindow({"me": os.getpid()})
    sum(i * i for i in range(200_000))  # some CPU for this process to be seen using
    result = window.result()
    assert result["process_cpu_pct"]["me"] is not None and result["process_cpu_pct"]["me"] >= 0
    assert result["machine_busy"] is None or 0.0 <= result["machine_busy"] <= 1.0
