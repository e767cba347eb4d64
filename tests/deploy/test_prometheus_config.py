"""The Prometheus scrape config, alerting rules and Grafana dashboard: promtool accepts them, the
alerts fire on the series they should (promtool unit tests), and every expression names only metrics
the server exports."""

import json
import subprocess

import grpc
import yaml

from deploy_support import DEPLOY, ROOT, exported_metric_names, prometheus_tool, promql_metric_names
from vaeserve.service import metrics, status

PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "vaeserve-dashboard.json"


def promtool(*args: str) -> str:
    result = subprocess.run([prometheus_tool("promtool"), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_promtool_check_config():
    out = promtool("check", "config", str(PROMETHEUS_YML))
    assert "SUCCESS: 1 rule files found" in out


def test_promtool_check_rules():
    out = promtool("check", "rules", str(ALERTS_YML))
    assert "SUCCESS: 9 rules found" in out


def test_alert_rules_unit_tests():
    out = promtool("test", "rules", str(ROOT / "tests" / "deploy" / "alerts_test.yml"))
    assert "SUCCESS" in out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


def test_alerts_cover_errors_latency_queue_readiness_and_loads():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "VaeserveHighErrorRatio", "VaeserveHighLatencyP99", "VaeserveQueueRejecting", "VaeserveQueueSaturated",
        "VaeserveModelLoadFailed", "VaeserveTargetDown", "VaeserveNoReadyReplicas", "VaeservePodNotReady",
        "VaeserveAnomalyRateDrift",
    }  # fmt: skip
    drift = rules["VaeserveAnomalyRateDrift"]["expr"]
    assert 'le="0.99"' in drift and "vaeserve_anomaly_score_count" in drift and "0.99" in map(str, metrics.QUANTILE_LEVELS)
    assert "histogram_quantile(0.99" in rules["VaeserveHighLatencyP99"]["expr"]
    # vaeserve_rejected_total{reason="overloaded"} counts the RESOURCE_EXHAUSTED answers of full queues,
    # which vaeserve_requests_total counts too, by model: this alert covers them, no second one needed.
    assert 'code="RESOURCE_EXHAUSTED"' in rules["VaeserveQueueRejecting"]["expr"]
    overloaded = [kind for kind, reason in status.REJECTED_REASONS.items() if reason == "overloaded"]
    assert overloaded and all(status.STATUS[kind] == grpc.StatusCode.RESOURCE_EXHAUSTED for kind in overloaded)
    failed_loads = 'vaeserve_model_loads_total{job="vaeserve", result="failed"}'
    assert f"increase({failed_loads}[10m])" in rules["VaeserveModelLoadFailed"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"page", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_expressions_use_exported_metrics():
    exported = exported_metric_names() | {"up"}
    from_kube_state_metrics = {"kube_pod_status_ready"}  # VaeservePodNotReady says it needs kube-state-metrics
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported | from_kube_state_metrics, (rule["alert"], names - exported)


def dashboard_targets() -> list[tuple[str, dict]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_expressions_use_exported_metrics():
    exported = exported_metric_names() | {"up"}
    targets = dashboard_targets()
    assert len(targets) >= 10
    for title, target in targets:
        names = promql_metric_names(target["expr"])
        assert names, title
        assert names <= exported, (title, names - exported)


def test_dashboard_shows_what_the_issue_asks():
    by_title = {}
    for title, target in dashboard_targets():
        by_title.setdefault(title, []).append(target["expr"])
    assert any("rate(vaeserve_requests_total" in e and 'code!="OK"' not in e for e in by_title["Request rate"])
    assert any('code!="OK"' in e for e in by_title["Errors by status code"])
    latency = " ".join(by_title["Request latency p50 / p99"])
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency
    queue = " ".join(by_title["Queue wait vs compute (p99)"])
    assert "vaeserve_queue_wait_seconds_bucket" in queue and "vaeserve_compute_seconds_bucket" in queue
    assert "vaeserve_batch_rows_bucket" in by_title["Batch size distribution"][0]
    assert "vaeserve_pending_requests" in by_title["Pending requests"][0]
    assert "vaeserve_rejected_total" in by_title["Calls rejected before compute"][0]
    assert "vaeserve_model_loads_total" in by_title["Model version loads"][0]
    flagged = " ".join(by_title["Anomaly rate vs calibrated"])
    assert "vaeserve_anomalous_rows_total" in flagged and "vaeserve_expected_anomaly_rate" in flagged
    assert all("vaeserve_anomaly_score_bucket" in e for e in by_title["Rows above calibration quantiles"])


def test_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "vaeserve" and dashboard["title"] == "vaeserve"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model"}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_metric_name_check_catches_a_misspelt_name():
    names = promql_metric_names('sum by (model) (rate(vaeserve_request_total{code!="OK"}[5m])) / on (model) up')
    assert names == {"vaeserve_request_total", "up"}
    assert not names <= exported_metric_names() | {"up"}
