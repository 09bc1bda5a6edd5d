"""The build report as one self-contained HTML page: inline CSS and SVG, no script, nothing
fetched from the network, so it opens anywhere (CI artifacts, mail, a laptop offline).

Charts: every target's chosen bundle by size and host latency against fp32 (the point (1, 1));
then per target, every candidate tried by latency, accuracy loss and size; the nodes the
sensitivity analysis blamed. Points carry data-* attributes so tests can read them."""
from __future__ import annotations

import html
import math
from pathlib import Path

from packager.figures import Accuracy, DropMetric, Timing
from packager.formats import backends
from packager.report import accuracy_text, device_text, human_bytes, latency_text, not_timed
from packager.results import COMPILE_REPORT, Verdict

COLORS = {Verdict.CHOSEN: "#1a7f37", Verdict.PASSED: "#0969da", Verdict.ACCURACY: "#cf222e", Verdict.SLOWER: "#bc4c00",
          Verdict.NO_GAIN: "#8250df", Verdict.ERROR: "#6e7781", Verdict.SKIPPED: "#6e7781", Verdict.NOT_TRIED: "#6e7781"}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1f2328}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#59636e}table{border-collapse:collapse;margin:6px 0 10px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
.ok{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.warn{color:#9a6700}
svg{background:#fff;border:1px solid #d0d7de;margin:6px 0}svg text{font:11px system-ui,sans-serif;fill:#1f2328}
.legend span{display:inline-block;margin-right:12px}.dot{display:inline-block;width:10px;height:10px;
border-radius:50%;margin-right:4px;vertical-align:middle}code{font-size:12px;background:#f6f8fa;padding:1px 3px}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _verdict(row: dict) -> Verdict | None:
    """A candidate row's verdict (None: one this edgepack does not know)."""
    try:
        return Verdict(row.get("verdict"))
    except ValueError:
        return None


def _ratio(lat: dict | None) -> float | None:
    t = Timing.from_dict(lat or {"not_timed": ""})
    if t.not_timed is not None:
        return None
    return 1.0 if t.baseline else t.median


def _spread(lat: dict | None) -> tuple[float, float] | None:
    """The inter-quartile range of a candidate's latency ratio, when it was compared."""
    r = Timing.from_dict(lat or {}).ratio
    return None if r is None else (r.q1, r.q3)


def _loss(row: dict | None) -> tuple[float | None, str]:
    """(loss, unit): accuracy drop in points, or 100 x (1 - cosine) for outputs that are not classes."""
    if not row:
        return None, ""
    acc = Accuracy.from_dict(row)
    if acc.accuracy_drop_points is not None:
        what = (acc.drop_metric or DropMetric.TOP1).text
        return max(acc.accuracy_drop_points, 0.0), f"{what} drop (points)"
    cos = acc.cosine_similarity
    return (None, "") if cos is None else (max(100 * (1 - cos), 0.0), "100 x (1 - cosine similarity)")


def _nice(step: float) -> float:
    """The smallest round step (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^k) at or above `step`."""
    k = 10 ** math.floor(math.log10(step)) if step > 0 else 1.0
    return next(m * k for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * k >= step - 1e-12)


class _Plot:
    """A scatter plot in SVG with log-scaled x (ratios) and linear y."""

    W, H, L, R, T, B = 500, 280, 56, 16, 16, 40

    def __init__(self, xs: list[float], ys: list[float], *, xlabel: str, ylabel: str, xlog: bool = True,
                 chart: str = ""):
        self.xlog = xlog
        xs = [x for x in xs if x] + [1.0]
        lo, hi = min(xs), max(xs)
        if xlog:
            lo, hi = math.log10(lo) - 0.08, math.log10(hi) + 0.08
        else:
            lo, hi = 0.0, hi * 1.15
        self.x0, self.x1 = lo, hi if hi > lo else lo + 1
        top = max([y for y in ys if y is not None] + [1.0])
        self.ystep = _nice(top * 1.1 / 4)  # four steps of a round size: the top label is the axis' top
        self.y0, self.y1 = 0.0, self.ystep * 4
        self.labels: list[tuple[float, float, float]] = []  # placed point labels: (x0, x1, y), to keep them apart
        self.parts = [f'<svg class="chart" data-chart="{_e(chart)}" width="{self.W}" height="{self.H}" viewBox="0 0 {self.W} {self.H}" '
                      f'role="img" aria-label="{_e(ylabel)} against {_e(xlabel)}">']
        self._axes(xlabel, ylabel)

    def px(self, x: float) -> float:
        v = math.log10(x) if self.xlog else x
        return self.L + (v - self.x0) / (self.x1 - self.x0) * (self.W - self.L - self.R)

    def py(self, y: float) -> float:
        return self.H - self.B - (y - self.y0) / (self.y1 - self.y0) * (self.H - self.T - self.B)

    def _axes(self, xlabel: str, ylabel: str) -> None:
        p, b = self.parts, self.H - self.B
        p.append(f'<line x1="{self.L}" y1="{b}" x2="{self.W - self.R}" y2="{b}" stroke="#8c959f"/>')
        p.append(f'<line x1="{self.L}" y1="{self.T}" x2="{self.L}" y2="{b}" stroke="#8c959f"/>')
        ticks = [0.25, 0.5, 1, 2, 4, 8, 16] if self.xlog else [i / 4 for i in range(0, 9)]
        for t in ticks:
            v = math.log10(t) if self.xlog else t
            if self.x0 <= v <= self.x1:
                x = self.px(t)
                p.append(f'<line x1="{x:.1f}" y1="{b}" x2="{x:.1f}" y2="{b + 4}" stroke="#8c959f"/>'
                         f'<text x="{x:.1f}" y="{b + 16}" text-anchor="middle">{t:g}x</text>')
        x1 = self.px(1.0)
        p.append(f'<line x1="{x1:.1f}" y1="{self.T}" x2="{x1:.1f}" y2="{b}" stroke="#d0d7de" stroke-dasharray="4 3"/>')
        for i in range(5):
            y = self.y0 + self.ystep * i
            p.append(f'<text class="ytick" x="{self.L - 6}" y="{self.py(y) + 4:.1f}" text-anchor="end">{round(y, 6):g}</text>')
        p.append(f'<text x="{(self.L + self.W - self.R) / 2}" y="{self.H - 6}" text-anchor="middle">{_e(xlabel)}</text>')
        p.append(f'<text transform="translate(12 {(self.T + b) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{_e(ylabel)}</text>')

    def point(self, x: float, y: float, *, r: float, color: str, label: str, title: str, data: dict,
              span: tuple[float, float] | None = None) -> None:
        cx, cy = self.px(x), self.py(y)
        if span:  # the inter-quartile range of the latency ratio
            self.parts.append(f'<line x1="{self.px(span[0]):.1f}" y1="{cy:.1f}" x2="{self.px(span[1]):.1f}" '
                              f'y2="{cy:.1f}" stroke="{color}" stroke-width="2" opacity="0.5"/>')
        attrs = " ".join(f'data-{k}="{_e(v)}"' for k, v in data.items())
        # the label right of the point, or left where it would run past the plot; moved down (then up)
        # from labels already placed that it would overlap (11 px text: at most ~7 px a character, 14 px a line)
        width = 7.0 * len(label)
        lx0 = cx + r + 3 if cx + r + 3 + width <= self.W - 2 else cx - r - 3 - width
        spots = [min(max(cy + 4 + dy, self.T + 8), self.H - self.B - 2) for dy in (0, 14, -14, 28, -28, 42, -42, 56, -56)]
        ly = next((y0 for y0 in spots if not any(a < lx0 + width and lx0 < b and abs(y - y0) < 14
                                                  for a, b, y in self.labels)), spots[0])
        self.labels.append((lx0, lx0 + width, ly))
        self.parts.append(f'<circle class="pt" cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="{color}" '
                          f'fill-opacity="0.75" stroke="#1f2328" stroke-width="0.6" {attrs}><title>{_e(title)}'
                          f'</title></circle><text class="pt-label" x="{lx0:.1f}" y="{ly:.1f}">{_e(label)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _targets_chart(targets: list[dict]) -> str:
    ok = [t for t in targets if t["ok"]]
    timed = [t for t in ok if _ratio(t["latency_ms"]) is not None]
    if not ok:
        return ""
    plot = _Plot([t["size_ratio"] for t in ok], [_ratio(t["latency_ms"]) for t in timed],
                 xlabel="model size vs fp32", ylabel="host latency vs fp32", xlog=False, chart="targets")
    plot.point(1.0, 1.0, r=5, color="#ffffff", label="fp32", title="fp32: the reference point",
               data={"target": "fp32", "x": 1.0, "y": 1.0})
    for t in timed:
        y = _ratio(t["latency_ms"])
        plot.point(t["size_ratio"], y, r=7, color=COLORS["chosen"], label=f"{t['target']} {t['candidate']}",
                   title=f"{t['target']}: {t['candidate']}, {t['size_ratio']:.2f}x size, {y:.2f}x latency, "
                         f"{accuracy_text(t['accuracy'])}", data={"target": t["target"], "x": t["size_ratio"], "y": y})
    untimed = [t["target"] for t in ok if t not in timed]
    note = (f'<p class="muted">Not on the chart (accelerators; the host CPU cannot time them): '
            f'{_e(", ".join(untimed))}.</p>') if untimed else ""
    return plot.svg() + note


def _candidates_chart(t: dict) -> str:
    """Every candidate by size and accuracy loss, and the timed ones by host latency and accuracy
    loss, fp32 the reference point in both."""
    rows = [c for c in t.get("candidates", []) if c.get("size_bytes") and _loss(c)[0] is not None]
    if not rows:
        return '<p class="muted">No candidate got as far as a measurement (see the table).</p>'
    fp32_size = (t.get("size_bytes") or {}).get("fp32_model") or max(c["size_bytes"] for c in rows)
    size = _scatter(t, rows, lambda c: c["size_bytes"] / fp32_size, "model size vs fp32", "size", log=False)
    timed = [c for c in rows if _ratio(c.get("latency")) is not None]
    lat = (_scatter(t, timed, lambda c: _ratio(c["latency"]), "host latency vs fp32 (IQR)", "latency", log=True)
           if timed else '<p class="muted">Not timed here (accelerator target, or no candidate passed the '
                         'accuracy gate).</p>')
    shown = {_verdict(c) for c in rows}
    legend = "".join(f'<span><i class="dot" style="background:{col}"></i>{_e(v.value)}</span>'
                     for v, col in COLORS.items() if v in shown)
    return f'<div>{size} {lat}</div><div class="legend">{legend}</div>'


def _scatter(t: dict, rows: list[dict], x_of, xlabel: str, chart: str, *, log: bool) -> str:
    plot = _Plot([x_of(c) for c in rows], [_loss(c)[0] for c in rows], xlabel=xlabel, ylabel=_loss(rows[0])[1],
                 xlog=log, chart=f"{chart}-{t['target']}")
    plot.point(1.0, 0.0, r=6, color="#ffffff", label="fp32", title="fp32: the reference point, no loss",
               data={"target": t["target"], "candidate": "fp32-reference", "x": 1.0, "y": 0.0})
    for c in rows:
        x, loss = x_of(c), _loss(c)[0]
        span = _spread(c.get("latency")) if chart == "latency" else None
        plot.point(x, loss, r=6, color=COLORS.get(_verdict(c), "#6e7781"), label=c["candidate"], span=span,
                   title=f"{c['candidate']}: {c['verdict']}; {human_bytes(c['size_bytes'])}; "
                         f"{latency_text(c.get('latency'))}; {c['why']}",
                   data={"target": t["target"], "candidate": c["candidate"], "verdict": c["verdict"],
                         "x": round(x, 4), "y": round(loss, 4)})
    return plot.svg()


def _sensitivity(t: dict) -> str:
    rows = t.get("sensitivity") or []
    if not rows:
        return ""
    top = max(r["error"] for r in rows) or 1.0
    w, bar = 520, 18
    parts = [f'<svg class="sens" width="{w}" height="{bar * len(rows) + 8}" role="img" aria-label="per-node error">']
    for i, r in enumerate(rows):
        y = 4 + i * bar
        length = 200 * r["error"] / top
        parts.append(f'<rect class="bar" x="4" y="{y}" width="{length:.1f}" height="{bar - 5}" fill="#cf222e" '
                     f'data-name="{_e(r["name"])}" data-error="{r["error"]}"><title>{_e(r["what"])} {_e(r["name"])} '
                     f'({_e(r["op"])}): {r["error"]:.3f}</title></rect><text x="{length + 10:.1f}" y="{y + 10}">'
                     f'{r["error"]:.2f} {_e(r["what"])} {_e(r["name"][:60])} ({_e(r["op"])})</text>')
    return ("<h3>Where the low precision loses accuracy</h3><p class='muted'>Normalised per-channel error, "
            "from the float model's intermediate tensors against the candidate's.</p>" + "".join(parts) + "</svg>")


def _sections(t: dict) -> str:
    """The sections of the backends that report on their own (findings, the device's compile step)."""
    return "".join(_section(t, title, prefix) for title, prefix in _own_sections())


def _own_sections() -> list[tuple[str, str]]:
    """(heading, lint code prefix) of each backend with a section of its own on the page."""
    return [(b.report_section, b.lint_prefix) for b in backends() if b.report_section]


def _section(t: dict, title: str, prefix: str) -> str:
    compiled = t.get(COMPILE_REPORT)
    mapping = [f for f in t.get("lint", []) if f["code"].startswith(prefix)]
    if not compiled and not mapping:
        return ""
    out = f"<h3>{_e(title)}</h3><ul>" + "".join(f"<li><b>{_e(f['level'])}</b> {_e(f['message'])}</li>"
                                                 for f in mapping)
    out += "</ul>"
    if compiled and compiled.get("op_table"):
        out += "<table><tr><th>op</th><th>count</th><th>status</th></tr>" + "".join(
            f"<tr><td>{_e(r['op'])}</td><td>{r['count']}</td><td>{_e(r['status'])}</td></tr>"
            for r in compiled["op_table"])
        out += "</table>"
    elif compiled and not compiled.get("compiled") and compiled.get("instructions") not in t.get("warnings", []):
        out += f'<p class="warn">{_e(compiled.get("instructions"))}</p>'
    return out


def _target_section(t: dict) -> str:
    head = f'<h2 id="{_e(t["target"])}">{_e(t["target"])} <span class="muted">({_e(t.get("format", ""))})</span></h2>'
    if t["ok"]:
        head += (f'<p><span class="ok">built</span> <code>{_e(Path(t["bundle"]).name)}</code>: {_e(t["candidate"])}, '
                 f'{_e(t["choice"])}.</p>')
    else:
        head += f'<p><span class="fail">failed ({_e(t["error_kind"])})</span> {_e(t["error"])}</p>'
    cands = t.get("candidates", [])
    dev = any(c.get("device_latency") for c in cands)  # --profile-on: the device's figures decided
    rows = "".join(f"<tr><td>{_e(c['candidate'])}</td><td style='color:{COLORS.get(_verdict(c), '#000')}'>"
                   f"{_e(c['verdict'])}</td><td>{_e(human_bytes(c['size_bytes']))}</td>"
                   f"<td>{_e(latency_text(c['latency']))}</td>"
                   + (f"<td>{_e(device_text(c.get('device_latency')))}</td>" if dev else "")
                   + f"<td>{_e(accuracy_text(c))}</td><td>{_e(c['why'])}</td></tr>"
                   for c in cands)
    table = ("<table><tr><th>candidate</th><th>verdict</th><th>size</th><th>host latency vs fp32 (IQR)</th>"
             + ("<th>device latency vs fp32 (p50)</th>" if dev else "")
             + f"<th>accuracy</th><th>why</th></tr>{rows}</table>") if rows else ""
    own = tuple(prefix for _, prefix in _own_sections())  # findings shown in their backend's section
    notes = [f"{f['level']}: [{f['code']}] {f['message']}" for f in t.get("lint", [])
             if f["level"] != "info" and not (own and f["code"].startswith(own))]
    notes += [f"WARNING: {w}" for w in t.get("warnings", [])]
    if not_timed(t):
        notes.append(f"latency: {not_timed(t)}")
    note_html = "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return head + table + _candidates_chart(t) + note_html + _sensitivity(t) + _sections(t)


def render(report: dict) -> str:
    shared = report.get("shared", {})
    v, gate = shared.get("validation") or {}, shared.get("gate") or {}
    dev = any(t.get("device_latency") for t in report["targets"] if t["ok"])
    summary = "".join(
        f"<tr><td><a href='#{_e(t['target'])}'>{_e(t['target'])}</a></td><td>{_e(t.get('format', '-'))}</td>"
        + (f"<td>{_e(t['candidate'])}</td><td>{_e(human_bytes(t['size_bytes']['model']))} ({t['size_ratio']:.2f}x)</td>"
           f"<td>{_e(latency_text(t['latency_ms']))}</td>"
           + (f"<td>{_e(device_text(t.get('device_latency')))}</td>" if dev else "")
           + f"<td>{_e(accuracy_text(t['accuracy']))}</td><td class='ok'>{_e(Path(t['bundle']).name)}</td>"
           if t["ok"] else
           f"<td colspan='{5 if dev else 4}'>-</td><td class='fail'>FAILED ({_e(t['error_kind'])})</td>") + "</tr>"
        for t in report["targets"])
    gate_text = ("OFF" if not gate.get("enabled", True) else
                 f"accuracy drop &le; {gate.get('max_drop_points')} pt, cosine &ge; {gate.get('min_similarity')}, "
                 f"relative error &le; {gate.get('max_relative_error')}")
    body = (f"<h1>edgepack build report</h1><p class='muted'>{_e(report['model'])} ({_e(report['source_format'])}); "
            f"{len(report['targets'])} target(s); {report['seconds']:.1f} s; validation: {_e(v.get('samples'))} "
            f"samples from {_e(v.get('source'))}{' with labels' if v.get('labels') else ''}; accuracy gate: "
            f"{gate_text}; search: {_e(shared.get('search', 'first'))}.</p>"
            "<table><tr><th>target</th><th>format</th><th>chosen</th><th>size (vs fp32)</th>"
            "<th>host latency vs fp32 (IQR)</th>" + ("<th>device latency vs fp32 (p50)</th>" if dev else "")
            + f"<th>accuracy</th><th>bundle</th></tr>{summary}</table>"
            "<h2>Targets: size and host latency against fp32</h2>" + _targets_chart(report["targets"])
            + "".join(_target_section(t) for t in report["targets"]))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edgepack build report: "
            f"{_e(Path(report['model']).name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def write(report: dict, path: Path) -> Path:
    """Write atomically (a reader never sees half a page), readable by others (0644)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render(report))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
