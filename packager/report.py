"""Human-readable rendering of build reports, manifests and benchmarks. A report's timings and
accuracy are read back into their types (packager/figures.py), this build's or an old bundle's."""
from __future__ import annotations

from packager.figures import Accuracy, DeviceTiming, DropMetric, Speed, Timing


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


WHY_WIDTH = 64  # the last column ("why") wraps onto lines of its own beyond this


def _table(rows: list[tuple], *, wrap_last: int | None = None) -> list[str]:
    if wrap_last:  # a long last cell goes on under itself, the other cells blank
        import textwrap

        rows = [row for r in rows for row in
                [r[:-1] + (part,) if i == 0 else ("",) * (len(r) - 1) + (part,)
                 for i, part in enumerate(textwrap.wrap(str(r[-1]), wrap_last) or [""])]]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def latency_text(lat: dict | None) -> str:
    """'0.41x (0.40-0.43) 1.071 ms', or why there is no figure."""
    if not lat:
        return "-"
    t = Timing.from_dict(lat)
    if t.not_timed is not None:
        return "not timed here"
    if t.baseline:
        return f"{t.b_ms:.3f} ms (fp32 itself)"
    r = t.ratio
    if t.host_load is not None and t.host_load.crowded and r.verdict is Speed.UNRESOLVED:
        return (f"{t.b_ms:.3f} ms tie ({r.median:.2f}x on a busy host: other processes used "
                f"{t.host_load.others:.1f} cores)")
    if r.resolved is False and r.verdict is Speed.SLOWER:
        return f"{t.b_ms:.3f} ms slower ({r.q1:.2f}-{r.q3:.2f}x: too spread for one figure)"
    if r.verdict is Speed.UNRESOLVED and r.q1 > 1.05:
        return f"{t.b_ms:.3f} ms tie ({r.q1:.2f}-{r.q3:.2f}x: not surely slower on this host)"
    if r.resolved is False:
        return f"{t.b_ms:.3f} ms unresolved ({r.q1:.2f}-{r.q3:.2f}x: too fast to time here)"
    return f"{t.b_ms:.3f} ms {r.median:.2f}x ({r.q1:.2f}-{r.q3:.2f})"


def device_text(lat: dict | None) -> str:
    """'0.95 ms 2.10x on pi-7' (p50 against the fp32 model's p50 on that device), or '-'."""
    if not lat:
        return "-"
    t = DeviceTiming.from_dict(lat)
    return f"{t.b_ms:.3f} ms {t.median:.2f}x on {t.device}"


def accuracy_text(acc: dict | None) -> str:
    """A report's accuracy section, or a candidate row: the figure its gate looked at first."""
    if not acc:
        return "-"
    a = Accuracy.from_dict(acc)
    if a.accuracy_bundle is not None:
        return f"{_pct(a.accuracy_bundle)} (fp32 {_pct(a.accuracy_reference)})"
    if a.drop_metric is DropMetric.ACCURACY and a.accuracy_drop_points is not None:
        return f"drop {a.accuracy_drop_points:.2f} pt"
    if a.top1_agreement is not None:
        return f"top-1 agree {_pct(a.top1_agreement)}"
    if a.cosine_similarity is not None:
        kept = a.primary.neighbour_agreement if a.primary is not None else None
        return f"cosine {a.cosine_similarity:.4f}" + ("" if kept is None else f", neighbours {_pct(kept)}")
    return "-"


def not_timed(t: dict) -> str | None:
    """Why a target's chosen bundle was not timed on this host (None: it was)."""
    return Timing.from_dict(t.get("latency_ms") or {}).not_timed


def build_table(report: dict) -> str:
    rows = [("target", "format", "chosen", "size (vs fp32)", "host latency vs fp32 (IQR)", "accuracy", "result")]
    for t in report["targets"]:
        if not t["ok"]:
            rows.append((t["target"], t.get("format", "-"), "-", "-", "-", "-", f"FAILED ({t['error_kind']})"))
            continue
        size = t["size_bytes"]
        rows.append((t["target"], t["format"], t["candidate"], f"{human_bytes(size['model'])} ({t['size_ratio']:.2f}x)",
                     latency_text(t["latency_ms"]), accuracy_text(t["accuracy"]), t["bundle"]))
    if any(t.get("device_latency") for t in report["targets"] if t["ok"]):  # --profile-on: host and device
        rows = [r[:5] + (("device latency vs fp32",) if i == 0 else (device_text(t.get("device_latency")),)) + r[5:]
                for i, (r, t) in enumerate(zip(rows, [None] + report["targets"]))]
    out = ["\n".join(_table(rows))]
    shared = report.get("shared", {})
    v, gate = shared.get("validation") or {}, shared.get("gate") or {}
    gate_text = ("OFF" if not gate.get("enabled", True) else
                 f"accuracy drop <= {gate.get('max_drop_points')} pt, cosine >= {gate.get('min_similarity')}")
    out.append(f"\nvalidation: {v.get('samples')} samples from {v.get('source')}"
               + (" with labels" if v.get("labels") else "") + f"; accuracy gate: {gate_text}; "
               f"build took {report['seconds']:.1f} s")
    for t in report["targets"]:
        out.append(f"\n{t['target']}:")
        cands = t.get("candidates") or []
        if cands:
            on_device = any(c.get("device_latency") for c in cands)
            crow = [("candidate", "verdict", "size", "host latency vs fp32 (IQR)") + (("device",) if on_device else ())
                    + ("accuracy", "why")]
            for c in cands:
                crow.append((c["candidate"] + (" (cached)" if c.get("cached") else ""), c["verdict"], human_bytes(c["size_bytes"]), latency_text(c["latency"]))
                            + ((device_text(c.get("device_latency")),) if on_device else ())
                            + (accuracy_text(c), c["why"]))
            out += ["  " + line for line in _table(crow, wrap_last=WHY_WIDTH)]
        notes = []
        if not t["ok"]:
            notes.append(f"error: {t['error']}")
        elif not_timed(t):
            notes.append(f"latency: {not_timed(t)}")
        for f in t.get("lint", []):
            if f["level"] != "info":
                notes.append(f"{f['level']}: [{f['code']}] {f['message']}")
        notes += [f"WARNING: {w}" for w in t.get("warnings", [])]
        out += [f"  - {n}" for n in notes]
    return "\n".join(out)


def manifest_text(m: dict, *, signed: bool) -> str:
    rt = m["runtime"]
    lines = [f"{m['name']} {m['version']}  target={m['target']['name']}  format={m['format']}  "
             f"precision={m['precision']}  signed={'yes' if signed else 'no'}",
             f"model: {m['model_file']}  runtime: {rt['name']} >= {rt.get('min_version') or '?'}"
             + (f"  delegates: {', '.join(rt['delegates'])}" if rt.get("delegates") else "")
             + (f"  providers: {', '.join(rt['providers'])}" if rt.get("providers") else ""),
             "inputs:"]
    for t in m["inputs"]:
        lines.append(_tensor(t))
    lines.append("outputs:")
    for t in m["outputs"]:
        lines.append(_tensor(t))
    conv = m.get("quantization") or {}
    if conv.get("io_layout"):  # a model converted from another format: which layout the app sends
        lines.append(f"layout: {conv['io_layout']} ({conv.get('converter', '?')}, from {conv.get('converted_from')})")
    lines.append("files:")
    for name, f in m["files"].items():
        lines.append(f"  {name:<24} {human_bytes(f['size']):>10}  sha256 {f['sha256'][:16]}...")
    rep = m.get("report") or {}
    if rep:
        acc, lat = rep.get("accuracy") or {}, rep.get("latency_ms") or {}
        lines.append(f"report: {rep.get('candidate')} chosen ({rep.get('choice')}); size {rep.get('size_ratio')}x "
                     f"fp32; host latency {latency_text(lat)}; {accuracy_text(acc)}")
    prov = m.get("provenance") or {}
    src = prov.get("source_model") or {}
    lines.append(f"built {prov.get('created')} from {src.get('file')} ({src.get('format')}, sha256 "
                 f"{str(src.get('sha256'))[:16]}...)")
    if not m.get("production_ready", True):
        lines.append("NOT FIT FOR PRODUCTION (random calibration or validation data)")
    for w in m.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _tensor(t: dict) -> str:
    q = t.get("quantization")
    qs = f"  scale={q['scale']:.6g} zero_point={q['zero_point']}" if q else ""
    return f"  {t['name']:<20} {t['dtype']:<8} {t['shape']}{qs}"
