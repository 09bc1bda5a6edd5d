"""TFLite dynamic range with the attention value projections in float (packager/formats/tflite_values.py),
on a one-head attention built in the test: the value projection is found by the graph's shape and gets
its fp32 weights back; the query and key projections stay int8."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
WIDTH = 64  # 64 x 64 weights: above the converter's 1024-element floor for quantizing a weight

# In a child: TFLite fp32 and dynamic-range models of softmax(q k^T) v with named projections.
CONVERT = r"""
import sys, numpy as np, tensorflow as tf
w, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
dense = {n: rng.normal(0, 0.2, (w, w)).astype(np.float32) for n in ("query", "key", "value")}

@tf.function(input_signature=[tf.TensorSpec([1, 8, w], tf.float32)])
def attend(x):
    q, k, v = (tf.matmul(x, dense[n], name=n) for n in ("query", "key", "value"))
    p = tf.nn.softmax(tf.matmul(q, k, transpose_b=True))
    return {"y": tf.matmul(p, v)}

for name, opt in (("fp32", []), ("dynamic", [tf.lite.Optimize.DEFAULT])):
    conv = tf.lite.TFLiteConverter.from_concrete_functions([attend.get_concrete_function()], attend)
    conv.optimizations = opt
    open(f"{out}/{name}.tflite", "wb").write(conv.convert())
"""


# In a child: LiteRT must not share a process that imported TensorFlow first (the dynamic-range kernels
# then compute wrong results: docs/benchmarks.md, text_models). Prints each model's max error to fp32.
ERRORS = r"""
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
def run(path, x):
    interp = Interpreter(model_path=path); interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x); interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])
x = np.random.default_rng(1).normal(size=(1, 8, int(sys.argv[1]))).astype(np.float32)
want = run(sys.argv[2], x)
print(*(float(np.abs(run(p, x) - want).max()) for p in sys.argv[3:]))
"""


def test_value_projection_weights_come_back_in_float(tmp_path):
    from packager.formats import tflite_values
    from packager.tflite_fb import read_model

    subprocess.run([sys.executable, "-c", CONVERT, str(WIDTH), str(tmp_path)], check=True, timeout=300,
                   capture_output=True)
    fp32, dynamic = (tmp_path / "fp32.tflite").read_bytes(), (tmp_path / "dynamic.tflite").read_bytes()
    assert len(tflite_values.value_projections(read_model(dynamic))) == 1
    assert tflite_values.value_projections(read_model(fp32))  # found by shape, whatever the weights' type
    mixed, names = tflite_values.float_values(dynamic, fp32)
    assert len(names) == 1 and "value" in names[0], names
    model = read_model(mixed)
    types = {t.name.decode(): t.type for t in model.subgraphs[0].tensors}
    assert types[names[0]] == 0 and sum(t == 9 for t in types.values()) == 2, types  # float32 value, int8 q and k
    (tmp_path / "mixed.tflite").write_bytes(mixed)
    out = subprocess.run([sys.executable, "-c", ERRORS, str(WIDTH), *(str(tmp_path / f"{n}.tflite") for n in
                          ("fp32", "dynamic", "mixed"))], check=True, timeout=120, capture_output=True, text=True)
    dynamic_err, mixed_err = map(float, out.stdout.split()[-2:])
    assert mixed_err < dynamic_err, (mixed_err, dynamic_err)
