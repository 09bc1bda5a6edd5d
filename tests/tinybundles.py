"""Tiny real bundles made without TensorFlow (ONNX graphs from onnx.helper): agents start in well
under a second with them. `log_bundle`: y = log(x) on [1, 4] floats, so x <= 0 gives NaN/-Inf."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def log_bundle(d: Path, *, name: str = "logm", version: str = "1.0.0", providers=("CPUExecutionProvider",),
               runtime: dict | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    from edgebundle.archive import write_bundle
    from edgebundle.manifest import Manifest, TensorSpec

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    g = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
    m = Manifest(name=name, version=version, target={"name": "x86-cpu"}, format="onnx", precision="fp32",
                 model_file="model.onnx", inputs=(TensorSpec("x", (1, 4), "float32"),),
                 outputs=(TensorSpec("y", (1, 4), "float32"),),
                 runtime=runtime or {"name": "onnxruntime", "providers": list(providers)})
    out = d / f"{name}-{version}.edgepack"
    write_bundle(out, m, {"model.onnx": d / "model.onnx"})
    return out


def infer_body(x) -> bytes:
    import json

    x = np.asarray(x, np.float32).reshape(1, 4)
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
