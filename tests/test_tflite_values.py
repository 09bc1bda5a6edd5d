"""TFLite dynamic range with the attention value projections in float (packager/formats/tflite_values.py),
on a one-head attention built in the test: the value projection is found by the graph's shape and gets
its weights back in float (stored as fp16); the query and key projections stay int8, unless a candidate names them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
WIDTH = 64  # 64 x 64 weights: above the converter's 1024-element floor for quantizing a weight

# The end of a child that converts `fn` to the fp32 and dynamic-range models the tests compare.
BOTH = r"""
for name, opt in (("fp32", []), ("dynamic", [tf.lite.Optimize.DEFAULT])):
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    conv.optimizations = opt
    open(f"{out}/{name}.tflite", "wb").write(conv.convert())
"""

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
fn = attend
""" + BOTH


# A child's helper: the model's one output on its one input, in LiteRT.
RUN = r"""
from ai_edge_litert.interpreter import Interpreter
def run(path, x):
    interp = Interpreter(model_path=path); interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x); interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])
"""

# In a child: LiteRT must not share a process that imported TensorFlow first (the dynamic-range kernels
# then compute wrong results: docs/benchmarks.md, text_models). Prints each model's max error to fp32.
ERRORS = r"""
import sys, numpy as np
""" + RUN + r"""x = np.random.default_rng(1).normal(size=(1, 8, int(sys.argv[1]))).astype(np.float32)
want = run(sys.argv[2], x)
print(*(float(np.abs(run(p, x) - want).max()) for p in sys.argv[3:]))
"""


def test_value_projection_weights_come_back_in_float(tmp_path):
    from packager.formats import tflite_values
    from packager.tflite_fb import read_model

    subprocess.run([sys.executable, "-c", CONVERT, str(WIDTH), str(tmp_path)], check=True, timeout=300,
                   capture_output=True)
    fp32, dynamic = (tmp_path / "fp32.tflite").read_bytes(), (tmp_path / "dynamic.tflite").read_bytes()
    fp32_weights = tflite_values.float_weights(read_model(fp32))
    assert len(tflite_values.value_projections(read_model(dynamic))) == 1
    assert tflite_values.value_projections(read_model(fp32))  # found by shape, whatever the weights' type
    mixed, names = tflite_values.float_values(dynamic, fp32_weights)
    assert len(names) == 1 and "value" in names[0], names
    model = read_model(mixed)
    types = {t.name.decode(): t.type for t in model.subgraphs[0].tensors}
    assert types[names[0]] == 0 and sum(t == 9 for t in types.values()) == 2, types  # float32 value, int8 q and k
    assert types[names[0] + "/fp16"] == 1, types  # stored as fp16, unpacked by a DEQUANTIZE at load
    from packager.tflite_fb import ops_with_versions
    assert ("DEQUANTIZE", 3) in ops_with_versions(mixed), ops_with_versions(mixed)
    (tmp_path / "mixed.tflite").write_bytes(mixed)
    out = subprocess.run([sys.executable, "-c", ERRORS, str(WIDTH), *(str(tmp_path / f"{n}.tflite") for n in
                          ("fp32", "dynamic", "mixed"))], check=True, timeout=120, capture_output=True, text=True)
    dynamic_err, mixed_err = map(float, out.stdout.split()[-2:])
    assert mixed_err < dynamic_err, (mixed_err, dynamic_err)
    # A candidate names more weights to keep in float (the sensitivity analysis ranks the hybrid ops):
    # the query's comes back too, by its weight tensor's name; the key stays int8
    hybrid = tflite_values.hybrid_ops(read_model(dynamic))
    weights = [read_model(dynamic).subgraphs[0].tensors[op.inputs[1]].name.decode() for op in hybrid]
    assert len(hybrid) == 3 and names[0] in weights, weights
    query = next(w for w in weights if "query" in w)
    more, kept = tflite_values.float_values(dynamic, fp32_weights, (query,))
    assert sorted(kept) == sorted([names[0], query]) and len(tflite_values.hybrid_ops(read_model(more))) == 1
    assert tflite_values.float_values(dynamic, fp32_weights, ("no such weight",))[1] == names


def test_smoothing_divides_the_outlier_channel_out_of_the_rows_scale(tmp_path):
    """tflite_smooth: with an input channel 30x the rest, the per-row scale of the hybrid projections
    leaves the other channels a few levels; dividing the channels by s (one MUL, shared by the three
    projections reading x) and multiplying the weights' columns by it brings the projections' error down
    (the toy's unscaled one-head Softmax then amplifies what is left: the model's output is not compared)."""
    from packager.formats import tflite_smooth, tflite_values
    from packager.tflite_fb import ops_with_versions, read_model

    subprocess.run([sys.executable, "-c", CONVERT, str(WIDTH), str(tmp_path)], check=True, timeout=300,
                   capture_output=True)
    fp32, dynamic = (tmp_path / "fp32.tflite").read_bytes(), (tmp_path / "dynamic.tflite").read_bytes()
    act = np.ones(WIDTH, np.float32) * 3
    act[3] *= 30  # the channel's max |value| on calibration data
    asked = []
    smoothed, names = tflite_smooth.smooth(dynamic, tflite_values.float_weights(read_model(fp32)),
                                           lambda want: asked.append(want) or {n: act for n in want})
    assert len(names) == 3 and len(asked[0]) == 1, (names, asked)  # q, k, v read one input: one range, one MUL
    ops = [op for op, _ in ops_with_versions(smoothed)]
    assert ops.count("MUL") == 1 and ops[0] == "MUL", ops  # the division comes first (x is the graph's input)
    assert len(tflite_values.hybrid_ops(read_model(smoothed))) == 3  # still int8 weights
    (tmp_path / "smoothed.tflite").write_bytes(smoothed)
    out = subprocess.run([sys.executable, "-c", PROJECTIONS, str(WIDTH), *(str(tmp_path / f"{n}.tflite") for n in
                          ("fp32", "dynamic", "smoothed"))], check=True, timeout=120, capture_output=True, text=True)
    plain, better = map(float, out.stdout.split()[-2:])
    assert better < 0.5 * plain, (better, plain)


# In a child: the largest error of the three projections' outputs against fp32, input channel 3 30x the rest.
PROJECTIONS = r"""
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
def run(path, x):
    i = Interpreter(model_path=path, experimental_preserve_all_tensors=True,
                    experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    i.allocate_tensors(); i.set_tensor(i.get_input_details()[0]["index"], x); i.invoke()
    names = {d["name"]: d["index"] for d in i.get_tensor_details()}
    return [i.get_tensor(names[n]) for n in sorted(names) if n.rstrip("0123456789") in ("query", "key", "value")
            and names[n] not in [o for op in i._get_ops_details() for o in op["inputs"][1:2]]]
x = np.random.default_rng(1).normal(size=(1, 8, int(sys.argv[1]))).astype(np.float32)
x[..., 3] *= 30
want = run(sys.argv[2], x)
print(*(max(float(np.abs(g - w).max()) for g, w in zip(run(p, x), want)) for p in sys.argv[3:]))
"""


# In a child: fp32 and dynamic-range models of an embedding lookup whose rows differ in size 300x.
TABLE = r"""
import sys, numpy as np, tensorflow as tf
out = sys.argv[1]
rng = np.random.default_rng(2)
table = (rng.normal(0, 1, (64, 32)) * np.geomspace(0.01, 3, 64)[:, None]).astype(np.float32)

@tf.function(input_signature=[tf.TensorSpec([1, 6], tf.int32)])
def embed(ids):
    return {"y": tf.gather(table, ids)}
fn = embed
""" + BOTH

# In a child: each model's largest error, relative to the size of the row it looked up, against fp32.
LOOKUPS = r"""
import sys, numpy as np
""" + RUN + r"""ids = np.array([[0, 1, 5, 30, 62, 63]], np.int32)
want = run(sys.argv[1], ids)
size = np.abs(want).max(axis=-1, keepdims=True)
print(*(float((np.abs(run(p, ids) - want) / size).max()) for p in sys.argv[2:]))
"""


def test_embedding_tables_get_a_scale_per_row(tmp_path):
    """tflite_tables: the converter's one scale for a whole GATHER table leaves a small row a level or
    two; a scale per row (a second GATHER of the scales and a MUL after the DEQUANTIZE) keeps every
    row to int8's own precision, at the same table bytes."""
    from packager.formats import tflite_tables, tflite_values
    from packager.tflite_fb import ops_with_versions, read_model

    subprocess.run([sys.executable, "-c", TABLE, str(tmp_path)], check=True, timeout=300, capture_output=True)
    fp32, dynamic = (tmp_path / "fp32.tflite").read_bytes(), (tmp_path / "dynamic.tflite").read_bytes()
    assert [op for op, _ in ops_with_versions(dynamic)] == ["GATHER", "DEQUANTIZE"]  # the converter's pattern
    rows, names = tflite_tables.per_row(dynamic, tflite_values.float_weights(read_model(fp32)))
    assert len(names) == 1 and [op for op, _ in ops_with_versions(rows)] == ["GATHER", "DEQUANTIZE", "GATHER", "MUL"]
    assert len(rows) < len(dynamic) + 64 * 4 + 1024  # the table's bytes, plus a float scale per row
    (tmp_path / "rows.tflite").write_bytes(rows)
    out = subprocess.run([sys.executable, "-c", LOOKUPS, *(str(tmp_path / f"{n}.tflite") for n in
                          ("fp32", "dynamic", "rows"))], check=True, timeout=120, capture_output=True, text=True)
    plain, better = map(float, out.stdout.split()[-2:])
    assert better <= 0.5 / 127 + 1e-6 < 0.1 < plain, (better, plain)  # half a level of its own row; 10 % of it before
