"""Helpers for the deploy tests: repository paths, the Prometheus tools, and the metric names the
server exports (read from vaeserve.service.metrics, so dashboards and alerts cannot drift from it)."""

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Series a scrape adds next to a metric family's name, by family type (prometheus_client naming).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


def prometheus_tool(name: str) -> str:
    """Path of `prometheus` or `promtool`; the test setup installs them (scripts/install_prometheus.sh)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install_prometheus.sh (Debian package `prometheus`)")
    return path


def exported_metric_names() -> set[str]:
    """Every series name a vaeserve /metrics page can carry: the service's metrics plus process metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.metrics import MetricWrapperBase

    from vaeserve.service import metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    names.update(sample.name for family in registry.collect() for sample in family.samples)
    return names


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, labels or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = re.findall(r"(?<![\w.$])[A-Za-z_:][\w:]*\b(?!\s*\()", expr)
    return {w for w in words if w.lower() not in PROMQL_KEYWORDS}


def serve_process(repository: Path, log: Path, **settings):
    """`vaeserve serve` run the way the image runs it: the installed console script, configured by
    VAESERVE_* variables, its output in `log`."""
    from vaeserve.benchmarks.harness import start_server

    return start_server(repository, log=log, entry_point=True, **settings)
