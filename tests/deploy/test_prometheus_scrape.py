"""A real Prometheus (the Debian package's binary) scrapes a real `vaeserve serve` on loopback; its
HTTP API must show exactly the requests this test sent, the alert rules must evaluate cleanly on the
live series, and every dashboard query must run. The container's health check script is run against
the same server."""

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from deploy_support import DEPLOY, prometheus_tool, serve_process

from vaeserve.benchmarks.harness import free_port

SCORE_REQUESTS = 12  # to vae, 4 rows each (an even number: sent in two rounds)
EMBED_REQUESTS = 8  # to ppca, 4 rows each (even)
BAD_REQUESTS = 1  # to vae, wrong row width: INVALID_ARGUMENT
TOTAL = SCORE_REQUESTS + EMBED_REQUESTS + BAD_REQUESTS
SCRAPE_SECONDS = 1


class Prometheus:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port

    def get(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 30.0):
        """Query until predicate(result) holds; the last result otherwise, for the failing assert."""
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result) or time.monotonic() > end:
                return result
            time.sleep(0.25)


def scalar(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    running = serve_process(model_repository, tmp_path_factory.mktemp("vaeserve") / "serve.log", drain_seconds=2)
    try:
        running.wait_serving()
        yield running
    finally:
        assert running.stop() == 0, running.log.read_text()  # a clean drain on SIGTERM


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            # The job name the shipped alerts and dashboard select on.
            {"job_name": "vaeserve", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "w")
    process = subprocess.Popen(
        [prometheus_tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    running = Prometheus(process, port)
    try:
        end = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < end, "Prometheus did not become ready:\n" + (tmp / "prometheus.log").read_text()
            time.sleep(0.1)
        yield running
    finally:
        process.terminate()
        assert process.wait(30) == 0, (tmp / "prometheus.log").read_text()
        log.close()


@pytest.fixture(scope="module")
def sent(server, prometheus, digits):
    """Send the requests once Prometheus scrapes the server, so every counter starts from a scraped zero."""
    from vaeserve.service.client import Client

    up = prometheus.wait_for('up{job="vaeserve"}', lambda r: scalar(r) == 1.0)
    assert scalar(up) == 1.0, up
    data, _, val, *_ = digits
    rows = data.x[val][:4].astype(np.float32)
    with Client(server.target) as client:
        # Two rounds, the first scraped before the second is sent: series appear at their first
        # request, so only increases after a scrape make rate() (the dashboard, the alerts) non-zero.
        for round_ in (1, 2):
            for _ in range(SCORE_REQUESTS // 2):
                assert client.score("vae", rows).neg_elbo.shape == (4,)
            for _ in range(EMBED_REQUESTS // 2):
                assert client.embed("ppca", rows).mu.shape == (4, 8)
            if round_ == 1:
                first = (SCORE_REQUESTS + EMBED_REQUESTS) // 2
                seen = prometheus.wait_for('sum(vaeserve_requests_total{job="vaeserve"})', lambda r: scalar(r) == first)
                assert scalar(seen) == first
        with pytest.raises(grpc.RpcError) as bad:
            client.score("vae", rows[:, :5])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_container_health_check_reports_serving(server):
    env = {"VAESERVE_PORT": str(server.port), "PATH": ""}
    result = subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py")], env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{server.port}: SERVING"


def test_prometheus_counts_every_request(prometheus, sent):
    total = prometheus.wait_for('sum(vaeserve_requests_total{job="vaeserve"})', lambda r: scalar(r) == TOTAL)
    assert scalar(total) == TOTAL
    latency = prometheus.wait_for('sum(vaeserve_request_latency_seconds_count{job="vaeserve"})', lambda r: scalar(r) == TOTAL)
    assert scalar(latency) == TOTAL
    by_labels = {
        (s["metric"]["method"], s["metric"]["model"], s["metric"]["code"]): float(s["value"][1])
        for s in prometheus.query('sum by (method, model, code) (vaeserve_requests_total{job="vaeserve"})')
    }
    assert by_labels == {
        ("Score", "vae", "OK"): SCORE_REQUESTS,
        ("Embed", "ppca", "OK"): EMBED_REQUESTS,
        ("Score", "vae", "INVALID_ARGUMENT"): BAD_REQUESTS,
    }
    versions = {s["metric"]["version"] for s in prometheus.query('vaeserve_requests_total{job="vaeserve"}')}
    assert versions == {"1"}  # every call here reached version 1, the bad one too (its model and version exist)
    # The histogram's buckets are cumulative: +Inf holds every request, and time was spent.
    inf = prometheus.query('sum(vaeserve_request_latency_seconds_bucket{job="vaeserve", le="+Inf"})')
    assert scalar(inf) == TOTAL
    assert scalar(prometheus.query('sum(vaeserve_request_latency_seconds_sum{job="vaeserve"})')) > 0


def test_model_info_names_every_served_graph(prometheus, sent):
    series = prometheus.query('vaeserve_model_info{job="vaeserve"}')
    graphs = {(s["metric"]["model"], s["metric"]["version"], s["metric"]["graph"]) for s in series}
    assert graphs == {(m, "1", g) for m in ("vae", "cvae", "ppca") for g in ("encoder", "decoder", "score")}
    assert {s["metric"]["provider"] for s in series} <= {"CPUExecutionProvider", "CUDAExecutionProvider"}


def test_alert_rules_evaluate_on_live_series(prometheus, sent):
    def evaluated(groups):
        rules = [rule for group in groups for rule in group["rules"]]
        return rules and all(rule["lastEvaluation"] > "2000" for rule in rules)

    end = time.monotonic() + 30
    while not evaluated(groups := prometheus.get("/api/v1/rules")["groups"]) and time.monotonic() < end:
        time.sleep(0.25)
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert len(rules) == 9
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # INVALID_ARGUMENT is the caller's fault: no error-ratio alert; nothing else is wrong either,
    # except VaeservePodNotReady having no kube-state-metrics to read here (it stays inactive too).
    assert {name for name, rule in rules.items() if rule["state"] != "inactive"} == set()


def test_every_dashboard_query_runs(prometheus, sent):
    dashboard = json.loads((DEPLOY / "grafana" / "vaeserve-dashboard.json").read_text())
    targets = [(panel["title"], t["expr"]) for panel in dashboard["panels"] for t in panel.get("targets", [])]
    # Grafana's variables, as Grafana would fill them in.
    fill = {"$__rate_interval": "1m", "$model": ".*"}
    results = {}
    for title, expr in targets:
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        if "vaeserve_rejected_total" in expr:
            # Its series may start only at the first rejection, and this server rejected nothing: the query must
            # run (Prometheus accepts it), with or without data.
            prometheus.query(expr)
            continue
        results[expr] = (title, prometheus.wait_for(expr, lambda r: len(r) > 0, timeout=10))
    assert [(title, expr) for expr, (title, result) in results.items() if not result] == []
    # The server-error ratio reads 0, not "no data": the one failed request was the caller's fault.
    [(ratio_title, ratio)] = [(title, r) for expr, (title, r) in results.items() if "code!~" in expr]
    assert {s["metric"]["model"]: float(s["value"][1]) for s in ratio} == {"vae": 0.0, "ppca": 0.0}, ratio_title


def test_prometheus_counts_scored_and_flagged_rows(prometheus, sent, server, digits, model_repository):
    from vaeserve.artifact.repository import load_version
    from vaeserve.service.client import Client

    rows = SCORE_REQUESTS * 4
    scored = prometheus.wait_for('sum(vaeserve_scored_rows_total{job="vaeserve", model="vae", version="1"})', lambda r: scalar(r) == rows)
    assert scalar(scored) == rows
    flagged = scalar(prometheus.query('sum(vaeserve_anomalous_rows_total{job="vaeserve", model="vae", version="1"})'))
    assert scalar(prometheus.query('sum(vaeserve_anomaly_score_count{job="vaeserve", model="vae"})')) == rows
    promised = load_version(model_repository / "vae" / "1").manifest.thresholds.promised_false_positive_rate
    assert scalar(prometheus.query('vaeserve_expected_anomaly_rate{job="vaeserve", model="vae", version="1"}')) == promised == 1 / 181
    data, _, val, *_ = digits  # the rows `sent` scored, once more (after the queries): as many flagged each time
    with Client(server.target) as client:
        assert flagged == SCORE_REQUESTS * int(client.score("vae", data.x[val][:4].astype(np.float32)).is_anomaly.sum())
