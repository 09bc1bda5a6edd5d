"""ONNX -> TFLite on the real ONNX models of the corpus (tests/corpus_models.py): for each, an fp32
arm-cpu build and one explicit int8 build for arm-cpu + coral (one onnx2tf conversion and one
calibration pass serve both), with the accuracy gate at its defaults. Prints, per bundle or failed
candidate: cosine / top-1 agreement against the ONNX model in ONNX Runtime, size and host latency
against fp32, and build time; for comparison, the same model's int8 on the ONNX path (x86-cpu).

    make corpus && python benchmarks/onnx_tflite.py [--models NAME ...] [--no-onnx-path]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
MODELS = ("ocr-orientation", "page-orientation", "wake-embedding", "ocr-detector", "ocr-recognizer", "silero-vad")


def figures(r) -> dict:
    """The chosen bundle's figures, or the last candidate's when the target failed."""
    from packager.results import Verdict

    t = next((t for t in r.tried if t.verdict is Verdict.CHOSEN), r.tried[-1] if r.tried else None)
    acc, lat = (t.accuracy, t.latency) if t is not None else (None, None)
    return {"target": r.target, "ok": r.ok, "candidate": t.label if t else None,
            "verdict": t.verdict.value if t else None, "cosine": acc.cosine_similarity if acc else None,
            "top1": acc.top1_agreement if acc else None,
            "size_kb": round(t.size_bytes / 1024, 1) if t is not None and t.size_bytes else None,
            "latency_vs_fp32": lat.median if lat else None, "error": None if r.ok else r.error.splitlines()[0][:140]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-onnx-path", action="store_true", help="skip the x86-cpu (ONNX Runtime int8) comparison")
    args = ap.parse_args()
    from corpus_models import prepared
    from packager.build import BuildOptions, build
    from targets import Precision

    runs = [("fp32", ("arm-cpu",), Precision.FP32), ("int8", ("arm-cpu", "coral"), Precision.INT8)]
    if not args.no_onnx_path:
        runs.append(("onnx-int8", ("x86-cpu",), Precision.INT8))
    with tempfile.TemporaryDirectory(prefix="edgepack-onnx-tflite-") as tmp:
        for cm, out, model, calib, valid in prepared(Path(tmp), args.models):
            for label, targets, prec in runs:
                t0 = time.perf_counter()
                res = build(BuildOptions(model=model, targets=targets, out_dir=out / label, precision=prec,
                                         calibration=str(calib), validation=str(valid), name=cm.name,
                                         bench_seconds=1.0))
                secs = round(time.perf_counter() - t0, 1)
                for r in res.results:
                    print(json.dumps({"model": cm.name, "run": label, "build_s": secs, **figures(r)}), flush=True)
                if label == "fp32" and not res.ok:
                    break  # no conversion: the int8 build fails the same way


if __name__ == "__main__":
    main()
