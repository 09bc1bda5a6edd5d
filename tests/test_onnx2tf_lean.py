"""onnx2tf's child, lean (packager/formats/onnx2tf_worker.py, onnx2tf_dummy.py): its first step (every
node's output from ONNX Runtime) gives onnx2tf the same outputs with the weights held once, and the
SavedModel it writes keeps the weights as variables, which the TFLite converter freezes into the same
constants. A small graph with real-sized weights (over both thresholds) made here."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

def _model(path):
    """ids (1, 16) -> Gather E (100 x 64) -> MatMul W0 (64 x 128) + b -> Relu -> MatMul W1 (128 x 64)
    -> ReduceMean over the last axis, kept -> Sub: `y` (1, 16, 64); every weight over 4 KB."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = {"E": rng.normal(0, 1, (100, 64)), "W0": rng.normal(0, 0.2, (64, 128)), "b": rng.normal(0, 0.1, 128),
         "W1": rng.normal(0, 0.2, (128, 64))}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W0"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["o"]),
             helper.make_node("ReduceMean", ["o"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["o", "m"], ["y"])]
    graph = helper.make_graph(nodes, "lean", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, sum(v.size for v in w.values() if v.size >= 1024)


@pytest.mark.slow
def test_the_dummy_run_gives_onnx2tf_the_same_outputs_from_one_copy_of_the_weights(tmp_path):
    """onnx2tf's own dummy_onnx_inference and the lean one, on the same graph and data: the same
    outputs, in the same order, the lean ones mapped from files; the weights it fed were held."""
    model, _ = _model(tmp_path / "m.onnx")
    np.save(tmp_path / "ids.npy", np.random.default_rng(5).integers(0, 100, (1, 16)))
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import numpy as np, onnx
        import onnx2tf  # noqa: F401  (sets up its process, as in the worker)
        import onnx2tf.onnx2tf as o2t
        from packager.formats import onnx2tf_dummy

        m = onnx.shape_inference.infer_shapes(onnx.load({str(model)!r}))
        names = [o for n in m.graph.node for o in n.output]
        kw = dict(output_names=names, custom_input_op_name_np_data_path=[["ids", {str(tmp_path / "ids.npy")!r}]],
                  tf_layers_dict={{}})
        want = o2t.dummy_onnx_inference(onnx_graph=m, **kw)
        onnx2tf_dummy.CHUNK_BYTES = 4096  # a run per few outputs
        held = []
        with onnx2tf_dummy.lean(Path({str(tmp_path / "outs")!r}), lambda: held.append(1)):
            got = o2t.dummy_onnx_inference(onnx_graph=m, **kw)
        print(json.dumps({{"n": len(want), "same": [bool(np.array_equal(a, b)) for a, b in zip(want, got)],
                          "mapped": all(isinstance(g, np.memmap) for g in got), "trims": len(held),
                          "restored": o2t.dummy_onnx_inference.__module__}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 7 and res["same"] == [True] * 7, res
    assert res["mapped"] and res["trims"] > 2  # several runs, a trim after each, and after the step
    assert res["restored"] == "onnx2tf.utils.common_functions"  # onnx2tf's own again after the block
    assert len(list((tmp_path / "outs").glob("*.npy"))) == 7


@pytest.mark.slow
def test_the_saved_model_keeps_the_weights_as_variables_and_converts_to_the_same_model(tmp_path):
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from packager.formats import tflite_converter
    from packager.formats.onnx2tf_worker import VARIABLE_ELEMENTS

    model, weights = _model(tmp_path / "m.onnx")
    ids = np.random.default_rng(6).integers(0, 100, (1, 16))
    np.savez(tmp_path / "sample.npz", ids=ids)
    req = {"onnx": str(model), "out": str(tmp_path / "sm"), "sample": str(tmp_path / "sample.npz"),
           "result": str(tmp_path / "result.json"), "inputs": [{"name": "ids", "shape": [1, 16], "dtype": "int64"}]}
    (tmp_path / "request.json").write_text(json.dumps(req))
    run = subprocess.run([sys.executable, "-m", "packager.formats.onnx2tf_worker", str(tmp_path / "request.json")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["ok"], (res, run.stdout[-2000:])
    assert not list(tmp_path.glob("tmp*")), "the dummy run's outputs are left behind"

    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((tmp_path / "sm" / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    consts = [n for n in nodes if n.op == "Const" and n.attr["dtype"].type == tf.float32.as_datatype_enum]
    biggest = max((int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim])) for n in consts), default=0)
    assert biggest < VARIABLE_ELEMENTS  # no weight in the graph itself
    shapes = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables")).get_variable_to_shape_map()
    assert sum(int(np.prod(s)) for s in shapes.values() if len(s) and np.prod(s) >= VARIABLE_ELEMENTS) >= weights

    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    data = tflite_converter.converter(str(tmp_path / "sm"), "fp32", allow_flex=False, lean_import=True).convert()
    runner = Interpreter(model_content=data).get_signature_runner()
    got = runner(ids=ids)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weights_stay_in_the_graph_where_a_subgraph_may_read_them_or_ort_takes_no_numpy_for_them(tmp_path):
    """Held (fed at run time): big initializers of a type ONNX Runtime takes from NumPy; none in a graph
    with an If, whose branches may read an outer initializer by name."""
    import onnx
    from onnx import TensorProto, helper

    from packager.formats.onnx2tf_dummy import _held

    model = onnx.load(_model(tmp_path / "m.onnx")[0])
    assert sorted(_held(model)) == ["E", "W0", "W1"]  # b: 512 bytes, under HELD_BYTES
    bf16 = helper.make_tensor("B", TensorProto.BFLOAT16, [4096], vals=b"\0" * 8192, raw=True)
    model.graph.initializer.append(bf16)
    assert "B" not in _held(model)
    branch = helper.make_graph([helper.make_node("Identity", ["W0"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    assert _held(model) == {}
