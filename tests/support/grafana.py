"""The shipped Grafana files (monitoring/grafana/) as tests read them, with no Grafana running.

`dashboards()` loads every dashboard JSON; `queries()` lists every panel query (one per target)
with the panel it belongs to; `expand()` does what Grafana does to a query before sending it to
Prometheus: replaces template variables and the built-ins the dashboards use ($__rate_interval,
$__range). An unknown `$name` is an error, never left in place, so a query can never reach
Prometheus half-expanded.

This module reads files only; it must never write under monitoring/.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from services.bus.config import REPO_ROOT

GRAFANA = REPO_ROOT / "monitoring" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "rdv.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "rdv.yml"
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")
# Grafana's own variables the dashboards may use; every other `$name` must be a template variable.
BUILTINS = ("__rate_interval", "__range")


@dataclass(frozen=True)
class Query:
    dashboard: str  # dashboard title
    panel: str  # panel title
    ref_id: str
    expr: str
    instant: bool  # Grafana runs an instant query (stat, table, bar gauge) else a range query

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws something (rows flattened, row headers themselves left out)."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(
            dashboard["title"],
            panel["title"],
            target["refId"],
            target["expr"],
            bool(target.get("instant")) and not target.get("range"),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


def variable_names(expr: str) -> set[str]:
    return {plain or braced for plain, braced in _VARIABLE.findall(expr)}


def expand(expr: str, values: dict[str, str]) -> str:
    """`expr` with every `$name` / `${name}` replaced from `values`; KeyError on an unknown one."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"query uses ${name}, which is not defined: {expr}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def variable_query(var: dict[str, Any]) -> str:
    """A query variable's query: a string, or the newer {"query": ...} object form."""
    query = var["query"]
    return query["query"] if isinstance(query, dict) else query


_LABEL_VALUES = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$")


def label_values_query(query: str) -> tuple[str, str]:
    """(series selector, label) of a Grafana `label_values(selector, label)` variable query."""
    found = _LABEL_VALUES.match(query.strip())
    if found is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return found["match"], found["label"]


def datasource() -> dict[str, Any]:
    """The one provisioned datasource."""
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return source


def rate_interval() -> str:
    """What Grafana substitutes for $__rate_interval on a short time range: 4 x timeInterval."""
    interval = datasource()["jsonData"]["timeInterval"]
    found = re.fullmatch(r"(\d+)s", interval)
    if found is None:
        raise ValueError(f"timeInterval {interval!r} is not in seconds")
    return f"{4 * int(found[1])}s"
