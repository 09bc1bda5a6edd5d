"""ONNX -> SavedModel with onnx2tf, in its own process (`python -m packager.formats.onnx2tf_worker REQUEST`,
or served: `--serve`, packager/formats/served.py, which keeps TensorFlow and onnx2tf imported between
conversions, 5 s each, and sets up onnx2tf's seeds and Keras' name counters again before each).

onnx2tf changes its process on import (silences every warning, sets TF_USE_LEGACY_KERAS, turns on
TensorFlow op determinism, lifts the recursion limit, seeds the global RNGs), so it never runs in
the build's process. The request (JSON) names the ONNX file, the resolved input shapes, a sample
to check the result on, and where to write the SavedModel and the result (JSON).

The SavedModel keeps the ONNX model's interface: the same input and output names, dtypes, shapes
and layout (NCHW inputs stay NCHW: onnx2tf transposes to NHWC inside; outputs that onnx2tf leaves
in NHWC are transposed back). So the validation data, the golden outputs and the app's feeds are
the same as for the ONNX model."""
from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from packager.formats import onnx2tf_dummy, served
from packager.formats.onnx_rewrite import weightless

# Node names onnx2tf turns into TensorFlow name scopes must match this.
_SCOPE = re.compile(r"[^A-Za-z0-9_.\-/]")
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# Read from the working directory (else downloaded from GitHub) by onnx2tf for 3-channel image inputs.
_ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
KEEP_BYTES = 1 << 30  # the served child leaves after a conversion that left it holding more
VARIABLE_ELEMENTS = 1024  # a captured float tensor this big is a variable in the SavedModel; smaller, a constant
UNCACHED_BYTES = 1 << 16  # a graph-surgeon constant this big is read each time it is asked for, not kept


def relu6_sigmoids(model) -> int:
    """HardSigmoid, and Clip to [0, 1], as relu6(6 x') / 6: onnx2tf writes them as min(max(x', 0), 1),
    which TFLite fuses into RELU_0_TO_1, an op the Edge TPU compiler cannot map (everything after
    the first one would run on the CPU); RELU6 and MUL map. Returns how many nodes it rewrote."""
    from onnx import helper, numpy_helper

    graph, consts = model.graph, {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0

    def const(name: str, value: float) -> str:
        if name not in consts:
            consts[name] = numpy_helper.from_array(np.array(value, np.float32), name)
            graph.initializer.append(consts[name])
        return name

    def scalar(name: str):
        t = consts.get(name)
        return float(numpy_helper.to_array(t)) if t is not None and numpy_helper.to_array(t).size == 1 else None

    for n in graph.node:
        x, y, tag = n.input[0] if n.input else "", n.output[0], f"edgepack_relu6_{count}"
        if n.op_type == "HardSigmoid":
            attrs = {a.name: a.f for a in n.attribute}
            scale, shift = 6 * attrs.get("alpha", 0.2), 6 * attrs.get("beta", 0.5)
        elif n.op_type == "Clip" and len(n.input) == 3 and (scalar(n.input[1]), scalar(n.input[2])) == (0.0, 1.0):
            scale, shift = 6.0, 0.0
        else:
            nodes.append(n)
            continue
        nodes += [helper.make_node("Mul", [x, const(f"{tag}_scale", scale)], [f"{tag}_a"], name=f"{tag}_mul"),
                  helper.make_node("Add", [f"{tag}_a", const(f"{tag}_shift", shift)], [f"{tag}_b"], name=f"{tag}_add"),
                  helper.make_node("Clip", [f"{tag}_b", const("edgepack_zero", 0.0), const("edgepack_six", 6.0)],
                                   [f"{tag}_c"], name=f"{tag}_clip"),
                  helper.make_node("Mul", [f"{tag}_c", const("edgepack_sixth", 1 / 6)], [y], name=f"{tag}_div")]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _plain_output_names(model) -> None:
    """Outputs whose names onnx2tf would change (it drops what it cannot find again, e.g. a name
    with ':') get plain ones; the signature gives them their ONNX names back (in graph order)."""
    for i, out in enumerate(model.graph.output):
        if _PLAIN.match(out.name):
            continue
        new = f"edgepack_output_{i}"
        for node in model.graph.node:
            node.output[:] = [new if o == out.name else o for o in node.output]
            node.input[:] = [new if x == out.name else x for x in node.input]
        out.name = new


def prepare(path: Path, shapes: dict[str, list[int]]):
    """(The ONNX graph with static input shapes, every node named, shapes folded (onnxslim), and
    HardSigmoid in a form the Edge TPU maps; its output names as they were)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    onnx_names = [o.name for o in model.graph.output]
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = size
    del model.graph.value_info[:]  # stale dynamic shapes; inferred again below
    for out in model.graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    seen = set()
    for i, node in enumerate(model.graph.node):
        name = _SCOPE.sub("_", node.name) if node.name else f"{node.op_type}_{i}"
        node.name = name if name not in seen else f"{name}_{i}"
        seen.add(node.name)
    relu6_sigmoids(model)
    _plain_output_names(model)
    model = weightless(lambda m: shape_inference.infer_shapes(m, data_prop=True), model)
    try:
        import onnxslim
        import onnxslim.core

        infer = onnxslim.core.shape_infer  # what slim() imports when it runs, between its passes

        def lean(m):
            # Each pass drops a graph-surgeon graph, a cycle holding a whole model: with TensorFlow's
            # objects in the heap, Python's collector reached them only after several passes
            # (MPNet: +440 MB a pass, 5.5 GB at the end of slim instead of 3.2).
            _trim()
            return weightless(infer, m)

        onnxslim.core.shape_infer = lean
        try:
            with _weights_read_when_asked("onnxslim.third_party.onnx_graphsurgeon.ir.tensor"):
                model = onnxslim.slim(model)  # folds Shape/Gather/Reshape chains onnx2tf mis-reads
        finally:
            onnxslim.core.shape_infer = infer
    except Exception:  # a graph onnxslim cannot fold is still worth a try unfolded
        pass
    return model, onnx_names



def _ref_outputs(path: Path, names: list[str], feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def _fix_layout(want: tuple[int, ...], ref: np.ndarray, value: np.ndarray):
    """The permutation that brings onnx2tf's output back to the ONNX shape: none, or NHWC -> NCHW."""
    rank = len(want)
    options = []
    if tuple(value.shape) == want:
        options.append(None)
    if rank >= 3:
        perm = (0, rank - 1) + tuple(range(1, rank - 1))
        if tuple(value.transpose(perm).shape) == want:
            options.append(perm)
    if not options:
        return None, f"shape {tuple(value.shape)} is not the ONNX shape {want}"
    errs = [np.abs((value if p is None else value.transpose(p)) - ref).max() if ref.size else 0.0 for p in options]
    return options[int(np.argmin(errs))], None


def _agrees(got: list[np.ndarray], refs: list[np.ndarray]) -> bool:
    """Do the converted outputs match ONNX Runtime's (as they are, or NHWC back to NCHW), element by
    element (a NaN where ONNX Runtime has a number does not)?"""
    if len(got) != len(refs):
        return False
    for ref, value in zip(refs, got):
        perm, why = _fix_layout(tuple(ref.shape), ref, value)
        if why:
            return False
        v = value if perm is None else value.transpose(perm)
        if not np.allclose(v.astype(np.float64), ref.astype(np.float64), rtol=1e-2, atol=1e-3):
            return False
    return True


def convert(req: dict) -> dict:
    import onnx
    import onnx2tf  # first, in this process only: it sets TF_USE_LEGACY_KERAS before TensorFlow loads
    import tensorflow as tf

    _freeze_imports()
    src, out = Path(req["onnx"]), Path(req["out"])
    shapes = {i["name"]: i["shape"] for i in req["inputs"]}
    model, onnx_names = prepare(src, shapes)
    static = out.parent / (out.name + "-static.onnx")
    onnx.save(model, str(static))
    nodes = {n.name: n.op_type for n in model.graph.node}
    names = [o.name for o in model.graph.output]  # as prepared (plain)
    del model  # onnx2tf reads the file: a copy of the weights fewer while it runs
    _trim()
    layout_4d = [i["name"] for i in req["inputs"] if len(i["shape"]) in (3, 4, 5)]
    with np.load(req["sample"]) as z:
        feeds = {i["name"]: z[i["name"]] for i in req["inputs"]}
    # onnx2tf's strict mode checks ops against ONNX Runtime on dummy inputs: give it the build's own sample,
    # and a stand-in for the image file it would otherwise download for 3-channel inputs.
    custom = []
    for i, (name, x) in enumerate(feeds.items()):
        np.save(out.parent / f"sample-{i}.npy", x)
        custom.append([name, str(out.parent / f"sample-{i}.npy")])
    np.save(Path.cwd() / _ONNX2TF_SAMPLE, np.zeros((1, 1, 1, 3), np.float32))
    refs = None
    try:  # now, while this process holds little: ONNX Runtime's session is another copy of the weights
        refs = _ref_outputs(static, names, feeds)
    except Exception:  # asked again after onnx2tf, whose error names the node
        pass
    _trim()
    order = [i["name"] for i in req["inputs"]]
    strict = False
    while True:
        try:
            with tempfile.TemporaryDirectory(dir=out.parent) as scratch, onnx2tf_dummy.lean(Path(scratch), _trim), \
                    _weights_read_when_asked():
                keras_model = onnx2tf.convert(
                    input_onnx_file_path=str(static), output_folder_path=str(out.parent / (out.name + "-onnx2tf")),
                    disable_model_save=True, not_use_onnxsim=True, not_use_opname_auto_generate=True,
                    non_verbose=True, verbosity="error", keep_ncw_or_nchw_or_ncdhw_input_names=layout_4d or None,
                    custom_input_op_name_np_data_path=custom, disable_strict_mode=not strict,
                    onnxruntime_output_memmap=False)  # onnx2tf_dummy keeps them on disk already
            got = keras_model([tf.constant(feeds[n]) for n in order] if len(order) > 1 else tf.constant(feeds[order[0]]),
                              training=False)
        except (Exception, SystemExit) as e:  # onnx2tf raises whatever its op converters raise, or exits
            if not strict:
                strict = True
                continue
            if isinstance(e, SystemExit):
                raise
            node = getattr(e, "onnx_op_name", None)
            return {"ok": False, "kind": "op", "node": node, "op": nodes.get(node), "message": _first_line(e)}
        got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
        _trim()
        refs = _ref_outputs(static, names, feeds) if refs is None else refs
        if strict or _agrees(got, refs):
            break
        strict = True
        tf.keras.backend.clear_session()
    if len(got) != len(names):
        return {"ok": False, "kind": "shape", "node": None, "op": None,
                "message": f"onnx2tf kept {len(got)} of the {len(names)} outputs {onnx_names}"}
    perms = []
    for name, ref, value in zip(names, refs, got):
        perm, why = _fix_layout(tuple(ref.shape), ref, value)
        if why:
            return {"ok": False, "kind": "shape", "node": name, "op": None, "message": f"output {name!r}: {why}"}
        perms.append(perm)
    specs = [tf.TensorSpec(i["shape"], tf.as_dtype(i["dtype"]), name=i["name"]) for i in req["inputs"]]
    ref_shapes = [tuple(r.shape) for r in refs]
    held = [keras_model]  # its one reference, let go once traced: then the weights are the trace's alone
    del keras_model, got

    def serve(*args):
        ys = held[0](list(args) if len(args) > 1 else args[0], training=False)
        ys = ys if isinstance(ys, (list, tuple)) else [ys]
        res = {}
        for name, y, perm, shape in zip(onnx_names, ys, perms, ref_shapes):
            y = tf.transpose(y, perm) if perm else y
            res[name] = tf.reshape(y, shape) if not y.shape.is_fully_defined() else y
        return res

    def trace():
        traced = tf.function(serve, input_signature=specs).get_concrete_function()
        held.clear()
        return traced

    _write_saved_model(trace, specs, out)
    return {"ok": True, "transposed_outputs": [n for n, p in zip(onnx_names, perms) if p],
            "onnx2tf": onnx2tf.__version__, "strict_mode": strict}


def _write_saved_model(trace, specs: list, out: Path) -> None:
    """What `trace()` returns (a concrete function whose captures hold onnx2tf's weights as constants),
    written as a SavedModel whose weights are variables: the graph is imported again with each weight
    read from a variable. TFLiteConverter freezes them back into the same constants (the same ops and
    buffers, MPNet's outputs bit for bit; the weights' tensor names change), but reads them from the
    checkpoint one by one, not from a GraphDef that holds them all: its peak on MPNet 4.1 -> 2.2 GB
    (dynamic range), 4.6 -> 3.1 GB (fp32). Each weight is freed as its variable takes it."""
    import tensorflow as tf

    traced = trace()  # here, not the caller's: this frame holds the last reference and lets it go
    graph = traced.graph
    graph_def = graph.as_graph_def()  # captures are placeholders here: no weights in it
    captured = [t for _, t in graph.captures]
    inputs = [t.name for t in traced.inputs if all(t is not c for c in captured)]  # in the order of `specs`
    outputs = tf.nest.pack_sequence_as(traced.structured_outputs, [t.name for t in traced.outputs])
    handles = {id(v.handle): v for v in traced.variables}
    values = [(value, placeholder.name) for value, placeholder in graph.captures]
    del traced, graph, captured
    _trim()
    weights, kept, small = [], [], []  # (placeholder, variable) for weights and Keras' own; (placeholder, value)
    for i, (value, name) in enumerate(values):
        values[i] = None  # this loop's copy is the last reference: freed as its variable takes it
        if value.dtype == tf.resource:
            if id(value) not in handles:
                raise ValueError("the converted model captures a resource that is not a variable")
            kept.append((name, handles[id(value)]))
        elif value.dtype.is_floating and value.shape.num_elements() >= VARIABLE_ELEMENTS:
            weights.append((name, tf.Variable(value, trainable=False, name=f"weight_{len(weights)}")))
        else:
            small.append((name, value.numpy()))
        del value

    def call(*args):
        feeds = dict(zip(inputs, args))
        feeds.update({name: v.read_value() for name, v in weights})
        # the handle itself, captured: an Identity in between would stop the converter from freezing it
        feeds.update({name: tf.compat.v1.get_default_graph().capture(v.handle) for name, v in kept})
        feeds.update({name: tf.constant(value) for name, value in small})
        names = tf.nest.flatten(outputs)
        got = tf.graph_util.import_graph_def(graph_def, input_map=feeds, return_elements=names, name="")
        return tf.nest.pack_sequence_as(outputs, got)

    module = tf.Module()
    module.weights = [v for _, v in weights + kept]
    module.serve = tf.function(call, input_signature=specs)
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve.get_concrete_function()})


@contextlib.contextmanager
def _weights_read_when_asked(module: str = "onnx_graphsurgeon.ir.tensor"):
    """Graph surgeon's constants keep the array of their first read for good: onnx2tf reads every
    weight once to build its TensorFlow constant, so its graph ended up holding a second copy of the
    weights beside the ONNX model's (MPNet: 440 MB); onnxslim (its own copy of graph surgeon, `module`)
    the same. While the block runs, a big one is read from the ONNX tensor each time it is asked for
    (a few times per weight in a conversion) and not kept."""
    import importlib

    tensor = importlib.import_module(module)
    Constant, LazyValues = tensor.Constant, tensor.LazyValues  # noqa: N806 (classes)
    cached = Constant.values

    def read(self):
        lazy = self._values
        if isinstance(lazy, LazyValues) and lazy.nbytes >= UNCACHED_BYTES:
            return lazy.load()
        return cached.fget(self)

    Constant.values = property(read, cached.fset)
    try:
        yield
    finally:
        Constant.values = cached


def _freeze_imports() -> None:
    """TensorFlow's and onnx2tf's import-time objects left out of every later collection (once per
    process, before its first conversion): a full collection then costs ~0 s instead of ~0.2 s, and
    _trim runs ~10 times a conversion."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True


_frozen = False


def _trim() -> None:
    """served.trim, called ~10 times a conversion: with TensorFlow's objects in the heap, Python's
    collector reaches onnxslim's and onnx2tf's dropped graphs late."""
    served.trim()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]


def handle(path: Path) -> None:
    req = json.loads(path.read_text())
    try:
        res = convert(req)
    except SystemExit:  # onnx2tf logs an error and calls sys.exit(1): the build reads the log
        res = {"ok": False, "kind": "error", "node": None, "op": None, "message": ""}
    except Exception as e:
        res = {"ok": False, "kind": "error", "node": None, "op": None, "message": _first_line(e),
               "trace": traceback.format_exc()[-4000:]}
    Path(req["result"]).write_text(json.dumps(res))


def _fresh() -> None:
    """What onnx2tf's import set up, set up again for the next conversion in a served child: its seeds,
    and Keras' layer-name counters (a model's op names must not depend on what was converted before)."""
    import random

    import tensorflow as tf
    import tf_keras

    tf_keras.backend.clear_session()  # tf.keras is tf_keras here (onnx2tf set TF_USE_LEGACY_KERAS)
    random.seed(0)
    np.random.seed(0)
    tf.random.set_seed(0)
    tf_keras.utils.set_random_seed(0)


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        import onnx2tf  # noqa: F401  first: it sets TF_USE_LEGACY_KERAS before TensorFlow loads

        def one(path: Path) -> None:
            _fresh()
            handle(path)

        # leaves after a big model (MPNet: 1.8 GB held, beside the next step's TFLite converter child);
        # a small one's leaves it at ~0.6 GB, TensorFlow's and onnx2tf's imports
        return served.loop(one, lambda path: path.parent / "onnx2tf.log", keep_bytes=KEEP_BYTES)
    handle(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
