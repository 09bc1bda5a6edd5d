"""Dynamic-range int8 that loses the gate keeps the projections the sensitivity analysis ranks worst
in float (issue 27, item 2): on arm-cpu (ONNX -> TFLite), a dense graph built here whose third MatMul
reads an outlier channel (200x the others: one scale per row leaves the rest a few levels). The
analysis ranks that projection first, the candidate keeps it (and the round's next) in float, stored
as fp16 behind a DEQUANTIZE, and it passes where plain dynamic range did not."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow
WIDTH, TOKENS, LAYERS = 64, 8, 5


def _model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = [rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH)).astype(np.float32) for _ in range(LAYERS)]
    outlier = np.ones(WIDTH, np.float32)
    outlier[3] = 200.0
    w[2][3] /= 200.0  # the outlier channel adds no more to the output than any other
    nodes, x = [], "x"
    for i in range(LAYERS):
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"mm{i}"))
        x = out
        if i == 1:
            nodes.append(helper.make_node("Mul", [x, "outlier"], ["wide"], name="wide"))
            x = "wide"
        elif i < LAYERS - 1:
            nodes.append(helper.make_node("Tanh", [x], [f"t{i}"], name=f"tanh{i}"))
            x = f"t{i}"
    inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)] + [numpy_helper.from_array(outlier, "outlier")]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, WIDTH])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_dynamic_range_keeps_the_projection_that_loses_in_float(tmp_path):
    from edgebundle.archive import open_bundle
    from packager.build import BuildOptions, build
    from packager.tflite_fb import ops_with_versions, read_model

    model = _model(tmp_path / "dense.onnx")
    rng = np.random.default_rng(1)
    for name in ("c", "v"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(size=(24, 1, TOKENS, WIDTH)).astype(np.float32))
    res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=tmp_path / "out", speed_gate=False,
                             calibration=str(tmp_path / "c.npz"), validation=str(tmp_path / "v.npz"), min_similarity=0.999))
    [r] = res.results
    assert r.ok, r.error
    rows = [(c["candidate"], c["verdict"]) for c in r.report["candidates"]]
    assert rows[:2] == [("dynamic", "accuracy"), ("dynamic+2f", "chosen")], rows
    ranked = r.report["sensitivity"]
    assert len(ranked) == LAYERS and {f["op"] for f in ranked} == {"FULLY_CONNECTED"}, ranked  # the hybrid ops only
    assert ranked[0]["error"] > 10 * ranked[1]["error"], ranked  # the outlier's reader, far ahead of the rest
    b = open_bundle(r.bundle)
    kept = b.manifest.quantization["float_nodes"]
    assert sorted(kept) == sorted(f["name"] for f in ranked[:2]), (kept, ranked)  # the two worst, by weight name
    m = read_model(b.read(b.manifest.model_file))
    types = [t.type for t in m.subgraphs[0].tensors if t.buffer and m.buffers[t.buffer].data is not None
             and len(m.buffers[t.buffer].data) >= WIDTH * WIDTH]
    assert sorted(types) == [1, 1, 9, 9, 9], types  # two fp16 weights, three int8
    assert [op for op, _ in ops_with_versions(b.read(b.manifest.model_file))].count("DEQUANTIZE") == 2
