"""The lean SavedModel converter (packager/formats/tflite_converter.py) writes the model
TFLiteConverter.from_saved_model writes, op for op and byte for byte, duplicate buffers merged."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a child (TensorFlow): a one-signature SavedModel with two constants of the same bytes in two shapes
# (the converter's own pass merges equal constants of one shape only), converted both ways
# to fp32 and dynamic range; prints what each wrote.
CHILD = r"""
import json, sys, numpy as np, tensorflow as tf
sys.path.insert(0, ".")
from packager.formats.tflite_converter import has_duplicates, lean
from packager.tflite_fb import read_model
out = sys.argv[1]
rng = np.random.default_rng(0)
w1, w2 = (tf.constant(rng.normal(0, 0.2, (64, 64)).astype(np.float32)) for _ in range(2))
bias = rng.normal(0, 0.1, 64).astype(np.float32)
b1, floor = tf.constant(bias), tf.constant(bias.reshape(1, 64))
m = tf.Module()
m.f = tf.function(lambda x: {"y": tf.maximum(tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2), floor)},
                  input_signature=[tf.TensorSpec([1, 64], tf.float32, name="x")])
tf.saved_model.save(m, f"{out}/sm", signatures={"serving_default": m.f.get_concrete_function()})

def summary(data):
    model = read_model(data)
    g = model.subgraphs[0]
    return {"ops": [int(model.operatorCodes[o.opcodeIndex].builtinCode) for o in g.operators],
            "tensors": [(t.name.decode(), [int(d) for d in t.shape], int(t.type)) for t in g.tensors],
            "data": [None if model.buffers[t.buffer].data is None else model.buffers[t.buffer].data.tobytes().hex()
                     for t in g.tensors],
            "buffers": [t.buffer for t in g.tensors], "duplicates": has_duplicates(data),
            "metadata": sorted(m.name.decode() for m in model.metadata or [])}

res = {}
for mode, opt in (("fp32", []), ("dynamic", [tf.lite.Optimize.DEFAULT])):
    for way, conv in (("std", tf.lite.TFLiteConverter.from_saved_model(f"{out}/sm")), ("lean", lean(f"{out}/sm"))):
        conv.optimizations = opt
        res[f"{way}-{mode}"] = summary(conv.convert())
print(json.dumps(res))
"""


@pytest.mark.slow
def test_lean_converter_writes_what_from_saved_model_writes(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for mode in ("fp32", "dynamic"):
        std, lean = res[f"std-{mode}"], res[f"lean-{mode}"]
        assert lean["ops"] == std["ops"] and lean["tensors"] == std["tensors"] and lean["data"] == std["data"], mode
        assert lean["buffers"] == std["buffers"] and not lean["duplicates"], mode
        same = [b for b, t, d in zip(lean["buffers"], lean["tensors"], lean["data"])
                if d is not None and t[1] in ([64], [1, 64]) and t[2] == 0]
        assert len(same) == 2 and same[0] == same[1], same  # the bias and the floor share one buffer
        assert "CONVERSION_METADATA" in std["metadata"] and "CONVERSION_METADATA" not in lean["metadata"]
    assert any(t[1] == [64, 64] and t[2] == 9 for t in res["lean-dynamic"]["tensors"])  # int8 weights


def test_duplicate_buffers_are_found_in_place():
    import flatbuffers
    import numpy as np

    from packager.formats.tflite_converter import has_duplicates
    from packager.tflite_fb import schema

    fb = schema()
    model = fb.ModelT()
    model.buffers = []
    for data in (None, b"\x01\x02\x03\x04", b"\x01\x02\x03\x05", b"\x09\x09"):
        buf = fb.BufferT()
        buf.data = None if data is None else np.frombuffer(data, np.uint8)
        model.buffers.append(buf)

    def written():
        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    assert not has_duplicates(written())
    model.buffers[2].data = np.frombuffer(b"\x01\x02\x03\x04", np.uint8)
    assert has_duplicates(written())
