"""The shipped monitoring/ files, checked for structure (no Grafana or Prometheus running).

Grafana is not installed here, so its provisioning and dashboards are held to what Grafana
needs and to what rdv exports: every dashboard query names only metrics rdv defines, uses only
variables the dashboard defines, and every panel uses the provisioned datasource. Whether each
query returns data is tests/integration/test_monitoring.py, against a real Prometheus.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services import fleet_exporter, metrics
from services.bus.config import REPO_ROOT
from tests.support import grafana

MONITORING = REPO_ROOT / "monitoring"
DASHBOARDS = grafana.dashboards()
# The metric families DESIGN.md ("Observability") says must exist, each shown on a dashboard.
DESIGN_FAMILIES = (
    "rdv_control_latency_seconds",
    "rdv_bus_latency_seconds",
    "rdv_link_rtt_seconds",
    "rdv_video_latency_seconds",
    "rdv_frames_total",
    "rdv_frames_dropped_total",
    "rdv_commands_rejected_total",
    "rdv_watchdog_trips_total",
    "rdv_session_state",
    "rdv_sessions_total",
    "rdv_presence_stations",
)
# What issue 5 asks each dashboard to show, as the families its panels must read.
SHOWN = {
    "teleop-session.json": (
        "rdv_control_latency_seconds",  # p50/p95/p99
        "rdv_link_rtt_seconds",
        "rdv_video_latency_seconds",
        "rdv_video_frames_decoded_total",  # fps
        "rdv_frames_dropped_total",
        "rdv_commands_rejected_total",
        "rdv_watchdog_trips_total",
        "rdv_session_state",
    ),
    "fleet.json": (
        "rdv_presence_stations",  # stations by role and status
        "rdv_station_last_seen_seconds",
        "rdv_session_state",  # sessions
        "rdv_sessions_total",
        "rdv_control_latency_seconds",  # per-station latency
    ),
}
_METRIC = re.compile(r"\b(rdv_[a-z_]+|up)\b")
_SELECTOR = re.compile(r"\{[^}]*\}")  # label matchers: job="rdv_gateway" is not a metric


def metrics_in(expr: str) -> list[str]:
    return _METRIC.findall(_SELECTOR.sub("", expr))


def exported_names() -> dict[str, str]:
    """Sample name -> family name, for every metric rdv defines (plus Prometheus' `up`)."""
    wrappers = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    wrappers.append(fleet_exporter.STATION_LAST_SEEN)
    names = {"up": "up"}
    for wrapper in wrappers:
        (family,) = wrapper.describe()
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_count", "_sum"],
        }[family.type]
        full = family.name + ("_total" if family.type == "counter" else "")
        for suffix in suffixes:
            names[family.name + suffix] = full
    return names


def families_read(dashboard: dict[str, Any]) -> set[str]:
    names = exported_names()
    return {
        names[found]
        for query in grafana.queries(dashboard)
        for found in metrics_in(query.expr)
        if found in names
    }


def test_there_are_two_dashboards_with_distinct_uids() -> None:
    assert set(DASHBOARDS) == set(SHOWN)
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) and all(uids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_query_names_only_metrics_rdv_exports(name: str) -> None:
    names = exported_names()
    for query in grafana.queries(DASHBOARDS[name]):
        used = metrics_in(query.expr)
        assert used, f"{query.name}: reads no metric"
        unknown = [found for found in used if found not in names]
        assert not unknown, f"{query.name}: {unknown} are not rdv metrics"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_shows_what_the_issue_asks(name: str) -> None:
    missing = set(SHOWN[name]) - families_read(DASHBOARDS[name])
    assert not missing, f"{name} shows none of {sorted(missing)}"


def test_every_design_metric_is_on_a_dashboard() -> None:
    shown = set().union(*(families_read(d) for d in DASHBOARDS.values()))
    assert set(DESIGN_FAMILIES) <= set(exported_names().values())
    assert not set(DESIGN_FAMILIES) - shown


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_queries_use_only_defined_variables(name: str) -> None:
    dashboard = DASHBOARDS[name]
    defined = set(grafana.variables(dashboard)) | set(grafana.BUILTINS)
    for query in grafana.queries(dashboard):
        undefined = grafana.variable_names(query.expr) - defined
        assert not undefined, f"{query.name}: undefined {sorted(undefined)}"
    for var in grafana.variables(dashboard).values():
        if var["type"] == "query":
            # The live test resolves these through Prometheus' label API, as Grafana does.
            grafana.label_values_query(grafana.variable_query(var))
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_and_query_uses_the_datasource_variable(name: str) -> None:
    dashboard = DASHBOARDS[name]
    source = grafana.variables(dashboard)["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    reference = {"type": "prometheus", "uid": "${datasource}"}
    for panel in grafana.panels(dashboard):
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference, panel["title"]
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_have_unique_ids_and_fit_the_grid_without_overlap(name: str) -> None:
    dashboard = DASHBOARDS[name]
    every = dashboard["panels"]  # rows included: they take a grid line too
    ids = [panel["id"] for panel in every]
    assert len(set(ids)) == len(ids)
    boxes = []
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        boxes.append((panel["title"], grid))
    for (a_title, a), (b_title, b) in itertools.combinations(boxes, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{a_title!r} overlaps {b_title!r}"


def test_datasource_provisioning_matches_the_prometheus_config() -> None:
    source = grafana.datasource()
    assert source["type"] == "prometheus" and source["isDefault"] is True
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    # $__rate_interval is 4 x timeInterval only if timeInterval is the real scrape interval.
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    assert grafana.rate_interval() == "20s"


def test_dashboard_provider_path_is_where_the_readme_puts_the_dashboards() -> None:
    (provider,) = yaml.safe_load(grafana.PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    readme = (REPO_ROOT / "README.md").read_text()
    # Both ways the README gives put the shipped files exactly where provisioning reads them.
    assert f"monitoring/grafana/dashboards:{path}" in readme
    assert "monitoring/grafana/provisioning:/etc/grafana/provisioning" in readme
    assert f"{path}/" in readme.replace(f"monitoring/grafana/dashboards:{path}", "")


def test_every_alert_has_a_rule_test_that_makes_it_fire() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((MONITORING / "tests" / "alerts_test.yml").read_text())
    fired = {
        case["alertname"]
        for test in cases["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired
