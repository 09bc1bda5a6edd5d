"""One `edgepack build` for three targets vs three separate plain conversion scripts.

Each plain script is a fresh Python process that imports TensorFlow, loads the model,
converts it the way that target needs, and writes the file: what people do today.
edgepack loads TensorFlow, the model, the reference and the calibration data once
(and also validates and times every bundle, which the plain scripts do not).
Target: edgepack time / plain total <= 0.6.

    python benchmarks/build_multi_target.py [--model PATH --calibration NPZ]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("arm-cpu", "jetson-gpu", "coral")

PLAIN = {
    "arm-cpu": """
        import numpy as np, tensorflow as tf, keras
        m = keras.models.load_model(MODEL, compile=False); m.export(OUT + "/sm", verbose=False)
        c = tf.lite.TFLiteConverter.from_saved_model(OUT + "/sm")
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        x = np.load(CALIB)["image"][:200]
        c.representative_dataset = lambda: ({"image": x[i:i+1]} for i in range(len(x)))
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        open(OUT + "/model.tflite", "wb").write(c.convert())
    """,
    "coral": """
        import numpy as np, tensorflow as tf, keras
        m = keras.models.load_model(MODEL, compile=False); m.export(OUT + "/sm", verbose=False)
        c = tf.lite.TFLiteConverter.from_saved_model(OUT + "/sm")
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        x = np.load(CALIB)["image"][:200]
        c.representative_dataset = lambda: ({"image": x[i:i+1]} for i in range(len(x)))
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = tf.uint8; c.inference_output_type = tf.uint8
        open(OUT + "/model_coral.tflite", "wb").write(c.convert())
    """,
    "jetson-gpu": """
        import tensorflow as tf, keras, tf2onnx, onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = keras.models.load_model(MODEL, compile=False)
        spec = [tf.TensorSpec(t.shape, t.dtype, name="image") for t in m.inputs]
        proto, _ = tf2onnx.convert.from_keras(m, input_signature=spec, opset=17)
        onnx.save(convert_float_to_float16(proto, keep_io_types=True), OUT + "/model.onnx")
    """,
}


def _time(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--calibration", type=Path)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best is reported")
    args = ap.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, calib = args.model, args.calibration
        if model is None:
            from packager.examples.digits import train

            info = train(tmp / "digits", epochs=10)
            model, calib = info["model"], tmp / "digits" / "calibration.npz"
        edgepack = [sys.executable, "-m", "edgepack.cli", "build", str(model), "--calibration", str(calib),
                    "-o", str(tmp / "bundles")] + [a for t in TARGETS for a in ("-t", t)]
        ours = min(_time(edgepack, env) for _ in range(args.repeat))
        plain = {}
        for t in TARGETS:
            script = tmp / f"plain_{t}.py"
            out = tmp / f"plain_{t}"
            out.mkdir()
            script.write_text(f"MODEL={str(model)!r}\nCALIB={str(calib)!r}\nOUT={str(out)!r}\n"
                              + textwrap.dedent(PLAIN[t]))
            plain[t] = min(_time([sys.executable, str(script)], env) for _ in range(args.repeat))
    total = sum(plain.values())
    print(f"model: {model}")
    print(f"edgepack build, {len(TARGETS)} targets in one process: {ours:6.2f} s "
          "(includes validation and latency runs)")
    for t, s in plain.items():
        print(f"  plain script {t:<11}: {s:6.2f} s")
    print(f"plain scripts total: {total:6.2f} s")
    print(f"ratio edgepack / plain = {ours / total:.2f}  (target <= 0.6)")


if __name__ == "__main__":
    main()
