"""The build table of a causal LM: per target the chosen candidate, and every candidate's gate figures and
speed, as `edgepack build` prints them."""
from __future__ import annotations

from packager.results import Verdict


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _rows(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def table(report: dict) -> str:
    rows = [("target", "chosen", "bundle", "agreement", "ppl ratio", "decode tok/s", "result")]
    for t in report["targets"]:
        if not t["ok"]:
            rows.append((t["target"], "-", "-", "-", "-", "-", f"FAILED ({t['error_kind']}): {t['error']}"))
            continue
        c = next(c for c in t["candidates"] if c["verdict"] == Verdict.CHOSEN)
        q, s = c["quality"] or {}, c["speed"] or {}
        rows.append((t["target"], t["chosen"], _bytes(t["bundle_bytes"]), f"{q.get('agreement', 0):.1%}",
                     f"{q.get('ppl_ratio', 0):.3f}", f"{s['decode_tok_s']:.1f}" if s else "untimed", t["bundle"]))
    out = ["\n".join(_rows(rows))]
    shared = report.get("shared", {})
    ref, gate, v = shared.get("reference") or {}, shared.get("gate") or {}, shared.get("validation") or {}
    gate_text = ("OFF" if not gate.get("enabled", True) else
                 f"top-1 agreement >= {gate.get('min_agreement'):.0%}, perplexity ratio <= {gate.get('max_ppl_ratio')}")
    out.append(f"\nreference: {ref.get('parameters', 0) / 1e6:.1f} M parameters, perplexity {ref.get('perplexity')} on "
               f"{ref.get('positions')} tokens of {v.get('source')}{' (from the build cache)' if ref.get('from_cache') else ''}; "
               f"gate: {gate_text}; build took {report['seconds']:.1f} s")
    for t in report["targets"]:
        if not t["candidates"]:
            continue
        out.append(f"\n{t['target']}: {t['why']}")
        crow = [("candidate", "verdict", "size", "agreement", "ppl ratio", "decode tok/s (range)", "ttft ms", "why")]
        for c in t["candidates"]:
            q, s = c["quality"] or {}, c["speed"] or {}
            crow.append((c["candidate"], c["verdict"], _bytes(c["bytes"]),
                         f"{q['agreement']:.1%}" if q else "-", f"{q['ppl_ratio']:.3f}" if q else "-",
                         f"{s['decode_tok_s']:.1f} ({s['decode_range'][0]:.1f}-{s['decode_range'][1]:.1f})" if s else "-",
                         f"{s['ttft_ms']:.1f}" if s else "-", c["why"] if c["verdict"] != Verdict.CHOSEN else ""))
        out.append("\n".join("  " + r for r in _rows(crow)))
    return "\n".join(out)
