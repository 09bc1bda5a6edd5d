"""GET /metrics: the agent in the Prometheus text exposition format (version 0.0.4).

Written by hand (a few dozen lines, no dependency, nothing imported at start-up). Names follow
Triton's where they map, so dashboards and alerts written for Triton work unchanged:

    nv_inference_request_success / _failure        requests (labels model, version)
    nv_inference_count / nv_inference_exec_count    inferences (batch items) / model executions
    nv_inference_request_duration_us                cumulative microseconds, as in Triton (counters:
    nv_inference_queue_duration_us                  rate(duration) / rate(success) is the mean)
    nv_inference_compute_{input,infer,output}_duration_us

Triton's duration series are counters; the distributions are histograms of their own, in seconds
as Prometheus recommends: edgepack_inference_{request,queue,compute}_duration_seconds. Generative
models add edgepack_generation_* (requests by outcome, tokens, time to first token, decode rate,
queue depth, KV cache). The rest:
model and agent info, agent and update state, NaN/Inf outputs, MQTT link, telemetry buffer,
host readings and the standard process_* series. docs/metrics.md lists every name.
"""
from __future__ import annotations

import math
import os

from device_agent import __version__
from device_agent.lifecycle import AgentState
from device_agent.ota.record import State as UpdateState
from device_agent.stats import PromHistogram


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class Exposition:
    """Collects families in order; `text()` renders them."""

    def __init__(self):
        self.lines: list[str] = []
        self.names: list[str] = []

    def family(self, name: str, kind: str, help_: str, samples) -> None:
        """samples: [(labels or None, value)]; nothing is written for an empty family but its header."""
        self.names.append(name)
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(lb)} {_num(v)}" for lb, v in samples]

    def histogram(self, name: str, help_: str, series: list[tuple[dict, PromHistogram]]) -> None:
        self.names.append(name)
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for lb, h in series:
            for le, acc in h.cumulative():
                self.lines.append(f"{name}_bucket{_labels({**lb, 'le': le})} {acc}")
            self.lines.append(f"{name}_sum{_labels(lb)} {_num(h.sum)}")
            self.lines.append(f"{name}_count{_labels(lb)} {h.count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


_TRITON = (  # (name, help, ModelCounters attribute)
    ("nv_inference_request_success", "Number of successful inference requests", "success"),
    ("nv_inference_request_failure", "Number of failed inference requests (the model failed on a valid request)",
     "failure"),
    ("edgepack_inference_rejected_total", "Requests refused before the model ran (bad input: HTTP 400)",
     "rejected"),
    ("nv_inference_count", "Number of inferences performed (a batch of N counts N)", "inferences"),
    ("nv_inference_exec_count", "Number of model executions performed", "executions"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds", "request_us"),
    ("nv_inference_queue_duration_us", "Cumulative time requests waited for the model, in microseconds",
     "queue_us"),
    ("nv_inference_compute_input_duration_us", "Cumulative input decode and check time in microseconds",
     "input_us"),
    ("nv_inference_compute_infer_duration_us", "Cumulative model run time in microseconds", "infer_us"),
    ("nv_inference_compute_output_duration_us", "Cumulative output encode time in microseconds", "output_us"),
)


def _read_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmSize"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _generation(e: Exposition, per_model, slots) -> None:
    """Text generation: cumulative per (model, version) from the API's records, and the live queue,
    generations running and KV cache of each generative model serving now."""
    gens = [({"model": m, "version": v}, c.generation) for (m, v), c in per_model if c.generation is not None]
    e.family("edgepack_generation_requests_total", "counter",
             "Generation requests by how they ended: stop (end of text or a stop sequence), length (max_tokens), "
             "cancelled (the client left), failed, queue_full (refused: HTTP 503)",
             [({**lb, "outcome": k}, n) for lb, g in gens for k, n in g.outcomes.items()])
    e.family("edgepack_generation_prompt_tokens_total", "counter", "Prompt tokens of generation requests",
             [(lb, g.prompt_tokens) for lb, g in gens])
    e.family("edgepack_generation_completion_tokens_total", "counter", "Tokens generated",
             [(lb, g.completion_tokens) for lb, g in gens])
    e.histogram("edgepack_generation_time_to_first_token_seconds",
                "From a generation request's arrival to its first token (queue and prefill included)",
                [(lb, g.ttft_h) for lb, g in gens])
    e.family("edgepack_generation_decode_tokens_total", "counter", "Tokens decoded after each request's first",
             [(lb, g.decode_tokens) for lb, g in gens])
    e.family("edgepack_generation_decode_seconds_total", "counter",
             "Time spent decoding them (rate of tokens / rate of seconds: decode tokens per second)",
             [(lb, round(g.decode_s, 6)) for lb, g in gens])
    e.family("edgepack_generation_decode_tokens_per_second", "gauge",
             "Decode speed of the last generation of two tokens or more",
             [(lb, round(g.last_tps, 3)) for lb, g in gens if g.last_tps is not None])
    live = [(s.name, s.model.generation) for s in slots if s.model is not None and s.model.generation is not None]
    e.family("edgepack_generation_queue_depth", "gauge", "Generation requests waiting for their turn",
             [({"model": n}, g.waiting) for n, g in live])
    e.family("edgepack_generation_in_flight", "gauge", "Generations running now",
             [({"model": n}, g.running) for n, g in live])
    e.family("edgepack_generation_kv_cache_bytes", "gauge",
             "KV cache held by the running generations (prompt + max_tokens positions each)",
             [({"model": n}, g.kv_cache_bytes) for n, g in live])


def render_metrics(agent) -> str:
    """The whole exposition for one scrape of `agent` (a device_agent.service.Agent)."""
    e = Exposition()
    per_model = agent.stats.per_model()
    for name, help_, attr in _TRITON:
        e.family(name, "counter", help_,
                 [({"model": m, "version": v}, getattr(c, attr)) for (m, v), c in per_model])
    e.family("edgepack_inference_nonfinite_total", "counter",
             "Successful inferences whose float outputs held NaN or Inf",
             [({"model": m, "version": v}, c.nonfinite) for (m, v), c in per_model])
    for part, attr, what in (("request", "request_h", "whole request (decode, queue, run, encode)"),
                             ("queue", "queue_h", "wait for the model (one request runs at a time)"),
                             ("compute", "compute_h", "decode, run and encode, without the queue")):
        e.histogram(f"edgepack_inference_{part}_duration_seconds", f"Inference time: {what}",
                    [({"model": m, "version": v}, getattr(c, attr)) for (m, v), c in per_model])

    _generation(e, per_model, [s for s in list(agent.slots) if s.name])

    e.family("edgepack_agent_info", "gauge", "The agent: version and device id",
             [({"version": __version__, "device_id": agent.cfg.device_id}, 1)])
    state = agent.life.state
    e.family("edgepack_agent_state", "gauge", "The agent's state (1 for the current one)",
             [({"state": s.value}, int(s is state)) for s in AgentState])
    slots = [s for s in list(agent.slots) if s.name]
    e.family("edgepack_model_ready", "gauge", "Whether the model is loaded and serving",
             [({"model": s.name}, s.ready) for s in slots])
    info = []
    for s in slots:
        if s.model is not None:
            d = s.model.describe()
            info.append(({"model": s.name, "bundle_name": d["name"], "version": d["version"],
                          "bundle_sha256": d["bundle_sha256"], "runtime": d.get("runtime") or "",
                          "provider": d.get("provider") or "", "precision": d.get("precision") or "",
                          "target": d.get("target") or "", "threads": str(s.threads or "")}, 1))
    e.family("edgepack_model_info", "gauge", "The models being served", info)
    e.family("edgepack_model_provider_missing", "gauge",
             "Providers the bundle asks for that this host lacks (1 each): a GPU bundle running on the CPU",
             [({"model": s.name, "provider": p}, 1) for s in slots if s.model is not None
              for p in s.model.runtime.details.get("skipped") or []])
    e.family("edgepack_model_memory_need_bytes", "gauge",
             "Memory a model needs (its manifest, or estimated from its files): what admission checks",
             [({"model": s.name, "source": s.memory.source}, s.memory.need_bytes) for s in slots if s.memory])
    e.family("edgepack_model_memory_loaded_bytes", "gauge", "RSS growth when the model loaded",
             [({"model": s.name}, s.memory.loaded_bytes) for s in slots if s.memory and s.memory.loaded_bytes])
    e.family("edgepack_drift_psi", "gauge",
             "Population Stability Index of a model's input or output against its build's data (last telemetry window)",
             [({"model": s.name, "tensor": t}, v["psi"]) for s in slots for t, v in (s.drift or {}).items()
              if v.get("psi") is not None])
    runs = [(s.name, r.summary()) for s in slots if s.updater and (r := s.updater.shadow_run) is not None]
    e.family("edgepack_shadow_agreement", "gauge",
             "An update in its shadow phase: share of compared requests on which the candidate agrees",
             [({"model": n}, r["agreement"]) for n, r in runs if r["agreement"] is not None])
    e.family("edgepack_shadow_requests", "gauge", "An update in its shadow phase: requests sampled, compared, "
             "dropped (the worker was behind) and failed on the candidate so far",
             [({"model": n, "kind": k}, r[k]) for n, r in runs for k in ("sampled", "compared", "dropped", "errors")])
    rings = [(s.name, s.ring.summary()) for s in slots if s.ring is not None]
    e.family("edgepack_capture_requests", "gauge", "Captured requests on disk (data capture)",
             [({"model": n}, r["requests"]) for n, r in rings])
    e.family("edgepack_capture_bytes", "gauge", "Size of the capture ring on disk", [({"model": n}, r["bytes"]) for n, r in rings])
    e.family("edgepack_capture_dropped_total", "counter",
             "Requests drawn for capture but not kept: the writer was behind (reason=busy) or over the per-minute cap",
             [({"model": n, "reason": k}, r[f]) for n, r in rings for k, f in (("busy", "dropped"), ("rate", "rate_limited"))])
    upd = [(s.name, s.updater.summary() if s.updater else {"state": "idle", "attempts": 0}) for s in slots]
    e.family("edgepack_update_state", "gauge", "The over-the-air update's state (1 for the current one)",
             [({"model": n, "state": st.value}, int(st.value == u["state"])) for n, u in upd for st in UpdateState])
    e.family("edgepack_update_attempts", "gauge", "Attempts of the current update",
             [({"model": n}, u.get("attempts") or 0) for n, u in upd])
    connected = bool(agent.mqtt and agent.mqtt.connected.is_set())
    e.family("edgepack_mqtt_connected", "gauge", "Whether the agent is connected to its MQTT broker",
             [(None, connected)])

    buf = agent.queue.health()
    e.family("edgepack_telemetry_buffer_messages", "gauge", "Telemetry and events waiting in the disk buffer",
             [(None, buf["queued"])])
    e.family("edgepack_telemetry_buffer_dropped_total", "counter",
             "Buffered messages dropped to stay within the buffer's bounds", [(None, buf["dropped_total"])])
    e.family("edgepack_telemetry_buffer_write_errors_total", "counter",
             "Messages the disk buffer could not store (disk full, I/O error)", [(None, buf["write_errors"])])

    host = agent.metrics
    temp = host.temperature_c()
    e.family("edgepack_host_temperature_celsius", "gauge", "Hottest thermal zone",
             [] if temp is None else [(None, temp)])
    mem = host.memory()
    e.family("edgepack_host_memory_available_bytes", "gauge", "MemAvailable",
             [] if mem["available_bytes"] is None else [(None, mem["available_bytes"])])
    try:
        free = os.statvfs(host.disk_path)
        e.family("edgepack_host_disk_free_bytes", "gauge", "Free bytes on the data directory's file system",
                 [(None, free.f_bavail * free.f_frsize)])
    except OSError:
        e.family("edgepack_host_disk_free_bytes", "gauge", "Free bytes on the data directory's file system", [])

    st = _read_status()
    t = os.times()
    e.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds",
             [(None, round(t.user + t.system, 3))])
    e.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes",
             [(None, st["VmRSS"])] if "VmRSS" in st else [])
    e.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes",
             [(None, st["VmSize"])] if "VmSize" in st else [])
    fds = _open_fds()
    e.family("process_open_fds", "gauge", "Number of open file descriptors", [] if fds is None else [(None, fds)])
    e.family("process_start_time_seconds", "gauge", "Start time of the agent since the Unix epoch in seconds",
             [(None, round(host.started, 3))])
    return e.text()
