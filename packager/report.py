"""Human-readable rendering of build reports, manifests and benchmarks."""
from __future__ import annotations


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


def build_table(report: dict) -> str:
    rows = [("target", "format", "precision", "size (vs fp32)", "p50 ms (vs fp32)", "top-1 agree",
             "accuracy", "drop", "result")]
    for t in report["targets"]:
        if not t["ok"]:
            rows.append((t["target"], t.get("format", "-"), t.get("precision", "-"), "-", "-", "-", "-", "-",
                         f"FAILED ({t['error_kind']})"))
            continue
        acc = t["accuracy"] or {"accuracy_bundle": None, "accuracy_drop_points": None, "top1_agreement": None}
        size, lat = t["size_bytes"], t["latency_ms"]
        accuracy = ("-" if acc["accuracy_bundle"] is None
                    else f"{_pct(acc['accuracy_bundle'])} (fp32 {_pct(acc['accuracy_reference'])})")
        drop = "-" if acc["accuracy_drop_points"] is None else f"{acc['accuracy_drop_points']:.2f} pt"
        rows.append((t["target"], t["format"], t["precision"],
                     f"{human_bytes(size['model'])}" + (f" ({t['size_ratio']:.2f}x)" if t["size_ratio"] else ""),
                     f"{lat['bundle']['p50_ms']:.3f} ({lat['p50_ratio']:.2f}x)" if lat and lat["p50_ratio"] else "-",
                     _pct(acc["top1_agreement"]), accuracy, drop, t["bundle"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = ["\n".join(lines)]
    shared = report.get("shared", {})
    v = shared.get("validation") or {}
    out.append(f"\nvalidation: {v.get('samples')} samples from {v.get('source')}"
               + (" with labels" if v.get("labels") else "") + f"; build took {report['seconds']:.1f} s")
    for t in report["targets"]:
        notes = []
        if not t["ok"]:
            notes.append(f"error: {t['error']}")
        for f in t.get("lint", []):
            if f["level"] != "info":
                notes.append(f"{f['level']}: [{f['code']}] {f['message']}")
        notes += [f"WARNING: {w}" for w in t.get("warnings", [])]
        if notes:
            out.append(f"\n{t['target']}:")
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
    lines.append("files:")
    for name, f in m["files"].items():
        lines.append(f"  {name:<24} {human_bytes(f['size']):>10}  sha256 {f['sha256'][:16]}...")
    rep = m.get("report") or {}
    if rep:
        acc, lat = rep.get("accuracy") or {}, rep.get("latency_ms") or {}
        lines.append(f"report: size {rep.get('size_ratio')}x fp32; p50 {lat.get('bundle', {}).get('p50_ms')} ms "
                     f"({lat.get('p50_ratio')}x fp32) on {lat.get('host')}; top-1 agreement "
                     f"{_pct(acc.get('top1_agreement'))}; drop {acc.get('accuracy_drop_points')} pt")
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
