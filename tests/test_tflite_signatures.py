"""Length buckets as signatures of one .tflite (packager/formats/tflite_merge.py, LiteRTRuntime.signature)
on two FULLY_CONNECTED models written with the schema's object API (no converter): rows 8 and rows 2 of
the same weights, each with a bias of its own. The merged file stores the shared weights once and each
signature computes what its own model computed; the main graph keeps running beside the bucket's.
A model of several signatures runs through LiteRT's CompiledModel (edgeruntime/litert_compiled.py),
whose XNNPACK weight cache packs each weight once for all of them."""
from __future__ import annotations

import numpy as np
import pytest

from edgebundle.errors import InputError, RuntimeUnavailableError

K, N = 16, 64  # outputs, inputs: a 4 KB weight matrix


def _fc(rows: int, w: np.ndarray, bias: np.ndarray) -> bytes:
    import flatbuffers

    from packager.tflite_fb import schema

    fb = schema()

    def buffer(a=None):
        b = fb.BufferT()
        b.data = None if a is None else np.frombuffer(np.ascontiguousarray(a, np.float32).tobytes(), np.uint8)
        return b

    def tensor(name, shape, buf):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, fb.TensorType.FLOAT32, buf
        return t

    def mapped(name, index):
        t = fb.TensorMapT()
        t.name, t.tensorIndex = name, index
        return t

    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.FullyConnectedOptions, fb.FullyConnectedOptionsT()
    graph = fb.SubGraphT()
    graph.tensors = [tensor("x", [rows, N], 3), tensor("w", [K, N], 1), tensor("b", [K], 2), tensor("y", [rows, K], 4)]
    graph.inputs, graph.outputs, graph.operators = [0], [3], [op]
    sig = fb.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs, sig.outputs = [mapped("x", 0)], [mapped("y", 3)]
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.signatureDefs = 3, [code], [graph], [sig]
    model.buffers = [buffer(), buffer(w), buffer(bias), buffer(), buffer()]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_buckets_merged_into_one_file_share_the_weights_and_compute_the_same(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from edgeruntime.litert import LiteRTRuntime
    from packager.formats.tflite_layout import canonical
    from packager.formats.tflite_merge import merge_signatures

    rng = np.random.default_rng(3)
    w, b8, b2 = rng.normal(size=(K, N)), rng.normal(size=K), rng.normal(size=K)
    main, short = _fc(8, w, b8), _fc(2, w, b2)
    data, own = merge_signatures(main, {"len2": short})
    assert own == {"len2": 4 * K}  # its bias; the weights are the main model's
    assert len(data) < len(main) + 4 * K + 1024 < len(main) + len(short)  # the 4 KB of weights not stored twice
    (tmp_path / "m.tflite").write_bytes(canonical(data)[0])

    x8, x2 = rng.normal(size=(8, N)).astype(np.float32), rng.normal(size=(2, N)).astype(np.float32)
    rt = LiteRTRuntime.load(str(tmp_path / "m.tflite"))
    assert rt.details["api"] == "compiled-model" and "2 signatures" in rt.details["weights"]
    before = rt.run({"x": x8})["y"]
    bucket = rt.signature("len2")
    assert [t.shape for t in bucket.inputs] == [(2, N)] and [t.shape for t in rt.inputs] == [(8, N)]
    np.testing.assert_allclose(bucket.run({"x": x2})["y"], x2 @ w.T + b2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rt.run({"x": x8})["y"], x8 @ w.T + b8, rtol=1e-4, atol=1e-4)  # beside a live runner
    np.testing.assert_array_equal(rt.run({"x": x8})["y"], before)
    with pytest.raises(RuntimeUnavailableError, match="no signature 'len4'"):
        rt.signature("len4")
    with pytest.raises(InputError, match=r"is float32 \[2, 64\]; the model takes float32 \[8, 64\]"):
        rt.run({"x": x2})
    rt.close()
    bucket.close()

    two = _fc(8, w, b8)  # a graph of two subgraphs (control flow) is left alone: the caller keeps its files
    assert merge_signatures(data, {"len8": two}) is None


def test_outputs_that_are_nan_on_zeros_still_merge(tmp_path):
    """share_weights runs the merged main graph on zeros against the main file: a model that divides by
    the all-zero mask there (MiniLM in fp16, whose clamp(1e-9) is 0) answers NaN in both, which is
    the same answer, not a reason to keep a file per bucket (MiniLM arm-cpu fp16, one bucket: 89.9 MB of model files -> 45.1 MB)."""
    pytest.importorskip("ai_edge_litert")
    from packager.sequence import Bucket, Plan, share_weights

    rng = np.random.default_rng(4)
    w, b8, b2 = rng.normal(size=(K, N)), rng.normal(size=K), rng.normal(size=K)
    b8[0] = b2[0] = np.nan
    (tmp_path / "main.tflite").write_bytes(_fc(8, w, b8))
    (tmp_path / "len2.tflite").write_bytes(_fc(2, w, b2))
    x2 = rng.normal(size=(2, N)).astype(np.float32)
    bucket = Bucket(length=2, path=tmp_path / "len2.tflite", file="model.len2.tflite", accuracy=None,
                    golden_inputs=({"x": x2},), golden_outputs=({"y": (x2 @ w.T + b2).astype(np.float32)},), atol=1e-3)
    merged, plan = share_weights(Plan(buckets=(bucket,)), tmp_path / "main.tflite", tmp_path / "out" / "model.tflite")
    assert not plan.notes and merged.name == "model.tflite", plan.notes
    assert plan.buckets[0].signature == "len2"


def _cast(rows: int) -> bytes:
    """int64 ids [rows] -> CAST -> float32: a tensor type TensorBuffer does not take (ids, as text models have)."""
    import flatbuffers

    from packager.tflite_fb import schema

    fb = schema()
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.CAST
    code.version = 1
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    tensors = []
    for name, kind in (("ids", fb.TensorType.INT64), ("y", fb.TensorType.FLOAT32)):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [rows], kind, 0
        tensors.append(t)
    graph = fb.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1], [op]
    sig = fb.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex, sig.inputs, sig.outputs = "serving_default", 0, [fb.TensorMapT()], [fb.TensorMapT()]
    (sig.inputs[0].name, sig.inputs[0].tensorIndex), (sig.outputs[0].name, sig.outputs[0].tensorIndex) = ("ids", 0), ("y", 1)
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], [fb.BufferT()]
    model.signatureDefs = [sig]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_int64_ids_cross_the_compiled_model_and_it_leaves_stderr_quiet(tmp_path):
    """TensorBuffer takes no int64: ids go through as raw int32 pairs. LiteRT's environment logs INFO
    lines as it is made and as C++ tears it down after Python: none of them reach an agent's log.
    The ids' dtype and shape are checked (TensorBuffer would take any bytes of the right count)."""
    pytest.importorskip("ai_edge_litert")
    import subprocess
    import sys

    from packager.formats.tflite_merge import merge_signatures

    data, _ = merge_signatures(_cast(6), {"len3": _cast(3)})
    (tmp_path / "ids.tflite").write_bytes(data)
    code = f"""
import numpy as np
from edgeruntime.litert import LiteRTRuntime
from edgeruntime.quiet import quiet_native_exit
quiet_native_exit()  # as the agent's and the CLI's entry points do
rt = LiteRTRuntime.load({str(tmp_path / "ids.tflite")!r})
three = rt.signature("len3")
ids = np.array([2**40 + 7, -5, 123456789012], np.int64)
print(rt.details["api"], three.run({{"ids": ids}})["y"].tolist(), rt.run({{"ids": np.arange(6)}})["y"].tolist())
try:
    three.run({{"ids": ids.astype(np.int32)}})
except Exception as e:
    print(type(e).__name__, e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, refused = out.stdout.splitlines()
    assert first.split(" ", 1) == ["compiled-model", f"{[2.0**40, -5.0, 123456790528.0]} {[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}"]  # as float32 holds them
    assert refused == "InputError input 'ids' is int32 [3]; the model takes int64 [3]"
    assert out.stderr == ""
