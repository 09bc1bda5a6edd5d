"""Writes edgepack-agent.json (the Grafana dashboard) next to this file: `python make_dashboard.py`.
The JSON is committed; tests/test_metrics.py checks every metric it queries against a real agent."""
from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"


def panel(pid: int, title: str, exprs: list[tuple[str, str]], *, x: int, y: int, w: int = 12, h: int = 8,
          unit: str = "short", kind: str = "timeseries") -> dict:
    p = {"id": pid, "type": kind, "title": title, "datasource": DS,
         "gridPos": {"x": x, "y": y, "w": w, "h": h},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": legend}
                     for i, (e, legend) in enumerate(exprs)]}
    if kind == "table":
        p["targets"] = [dict(t, format="table", instant=True) for t in p["targets"]]
    return p


def dashboard() -> dict:
    q = lambda v: (f"histogram_quantile({v}, sum by (le, instance) "  # noqa: E731
                   f"(rate(edgepack_inference_request_duration_seconds_bucket{{{SEL}}}[{RATE}])))")
    per_req = lambda name: (f"sum by (instance) (rate({name}{{{SEL}}}[{RATE}])) / 1000 / "  # noqa: E731
                            f"sum by (instance) (rate(nv_inference_request_success{{{SEL}}}[{RATE}]))")
    panels = [
        panel(1, "Requests per second", [
            (f"sum by (instance, model, version) (rate(nv_inference_request_success{{{SEL}}}[{RATE}]))",
             "{{instance}} {{model}} {{version}}"),
            (f"sum by (instance, model, version) (rate(nv_inference_request_failure{{{SEL}}}[{RATE}]))",
             "failed {{instance}} {{model}}")], x=0, y=0, unit="reqps"),
        panel(2, "Latency p50 / p95 / p99", [(q(0.5), "p50 {{instance}}"), (q(0.95), "p95 {{instance}}"),
                                             (q(0.99), "p99 {{instance}}")], x=12, y=0, unit="s"),
        panel(3, "Where the time goes (ms per request, Triton counters)", [
            (per_req("nv_inference_queue_duration_us"), "queue {{instance}}"),
            (per_req("nv_inference_compute_input_duration_us"), "input {{instance}}"),
            (per_req("nv_inference_compute_infer_duration_us"), "infer {{instance}}"),
            (per_req("nv_inference_compute_output_duration_us"), "output {{instance}}"),
            (per_req("nv_inference_request_duration_us"), "request {{instance}}")], x=0, y=8, unit="ms"),
        panel(4, "Inferences and executions per second", [
            (f"sum by (instance) (rate(nv_inference_count{{{SEL}}}[{RATE}]))", "inferences {{instance}}"),
            (f"sum by (instance) (rate(nv_inference_exec_count{{{SEL}}}[{RATE}]))", "executions {{instance}}"),
            (f"sum by (instance) (rate(edgepack_inference_nonfinite_total{{{SEL}}}[{RATE}]))",
             "NaN/Inf outputs {{instance}}")], x=12, y=8, unit="short"),
        panel(5, "Queue and compute p95", [
            (f"histogram_quantile(0.95, sum by (le, instance) (rate(edgepack_inference_queue_duration_seconds_bucket"
             f"{{{SEL}}}[{RATE}])))", "queue {{instance}}"),
            (f"histogram_quantile(0.95, sum by (le, instance) (rate(edgepack_inference_compute_duration_seconds_bucket"
             f"{{{SEL}}}[{RATE}])))", "compute {{instance}}")], x=0, y=16, unit="s"),
        panel(6, "Model, agent and update state", [
            (f"edgepack_model_info{{{SEL}}}", ""), (f"edgepack_agent_state{{{SEL}}} == 1", ""),
            (f"edgepack_update_state{{{SEL}}} == 1", ""), (f"edgepack_agent_info{{{SEL}}}", "")],
              x=12, y=16, kind="table"),
        panel(7, "Process memory (RSS)", [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")],
              x=0, y=24, w=8, unit="bytes"),
        panel(8, "Process CPU", [(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}")],
              x=8, y=24, w=8, unit="percentunit"),
        panel(9, "Telemetry buffer", [
            (f"edgepack_telemetry_buffer_messages{{{SEL}}}", "queued {{instance}}"),
            (f"increase(edgepack_telemetry_buffer_dropped_total{{{SEL}}}[{RATE}])", "dropped {{instance}}"),
            (f"increase(edgepack_telemetry_buffer_write_errors_total{{{SEL}}}[{RATE}])", "write errors {{instance}}"),
            (f"edgepack_mqtt_connected{{{SEL}}}", "MQTT connected {{instance}}")], x=16, y=24, w=8),
        panel(10, "Device", [
            (f"edgepack_host_temperature_celsius{{{SEL}}}", "temperature C {{instance}}"),
            (f"edgepack_host_memory_available_bytes{{{SEL}}} / 1e6", "memory available MB {{instance}}"),
            (f"edgepack_host_disk_free_bytes{{{SEL}}} / 1e9", "disk free GB {{instance}}"),
            (f"edgepack_model_ready{{{SEL}}}", "model ready {{instance}} {{model}}")], x=0, y=32, w=24),
    ]
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"}],
        "uid": "edgepack-agent", "title": "edgepack agents", "tags": ["edgepack", "inference"],
        "schemaVersion": 39, "version": 1, "editable": True, "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s", "panels": panels,
        "templating": {"list": [
            {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "instance", "type": "query", "datasource": DS, "label": "Agent", "multi": True,
             "includeAll": True, "refresh": 2, "query": {"query": "label_values(edgepack_agent_info, instance)",
                                                         "refId": "instance"},
             "definition": "label_values(edgepack_agent_info, instance)"}]},
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("edgepack-agent.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
