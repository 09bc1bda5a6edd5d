"""ONNX graph plumbing: TensorFlow -> ONNX, a clean fp32 graph every mode starts from, and
every intermediate tensor of a model on a few samples (for the sensitivity analysis)."""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError, UnsupportedOpError

ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")  # the domains onnx's schema registry defines


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.ERROR):
    """Raise these loggers' level for one call: tf2onnx logs full tracebacks for optimizer passes
    it skips, and ORT's quantizer warns on the root logger about every per-channel axis it
    adapts. Our own report says what happened; the levels are restored afterwards."""
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, _ in saved:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, old in saved:
            lg.setLevel(old)


def tf_to_onnx(src, path: Path, opset: int) -> None:
    import onnx
    import tf2onnx

    fn = src.onnx_function()
    try:
        # CRITICAL: tf2onnx logs each op it leaves unconverted as an error; Erfc is rewritten
        # below, and any other such op is refused by name
        with quiet("tf2onnx", level=logging.CRITICAL):
            model, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    except Exception as e:  # tf2onnx raises bare Exceptions/ValueErrors for unsupported ops
        raise ConversionError(f"tf2onnx could not convert the model (opset {opset}): {str(e).splitlines()[0][:300]}",
                              hint="try another --opset (13-18), or a TFLite target") from None
    rewrite_erfc(model)
    refuse_unknown_ops(model)
    _rename_outputs(model, src.outputs)
    canonical_names(model)
    onnx.save(model, str(path))


def _graphs(graph):
    """The graph and every subgraph in it (If/Loop bodies), depth first."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graphs(sub)


def rewrite_erfc(model) -> int:
    """Rewrite each `Erfc(x)` as `1 - Erf(x)`; returns how many. TensorFlow's exact GELU (Keras'
    `gelu(x, approximate=False)`) is 0.5·x·erfc(-x/√2), tf2onnx copies the TensorFlow op Erfc
    into the graph as is, and Erfc is no ONNX op: ONNX Runtime refuses the whole model. 1 - erf(x)
    loses erfc's relative precision only where it is below float epsilon, where GELU is ~0 anyway."""
    from onnx import TensorProto, helper, numpy_helper

    if not any(n.op_type == "Erfc" and n.domain in ONNX_DOMAINS for g in _graphs(model.graph) for n in g.node):
        return 0
    types = _elem_types(model)
    done = 0
    for g in _graphs(model.graph):
        ones: dict[int, str] = {}
        nodes = []
        for n in g.node:
            if n.op_type != "Erfc" or n.domain not in ONNX_DOMAINS:
                nodes.append(n)
                continue
            elem = types[n.output[0]] = types.get(n.input[0], TensorProto.FLOAT)  # an Erfc after an Erfc
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            if elem not in ones:
                ones[elem] = f"edgepack_one_{dtype.name}_{len(ones)}"
                g.initializer.append(numpy_helper.from_array(np.ones((), dtype), ones[elem]))
            erf = f"{n.output[0]}/erf"
            nodes += [helper.make_node("Erf", [n.input[0]], [erf], name=f"{n.name}/erf"),
                      helper.make_node("Sub", [ones[elem], erf], [n.output[0]], name=n.name)]
            done += 1
        del g.node[:]
        g.node.extend(nodes)
    return done


def _elem_types(model) -> dict[str, int]:
    """The element type of each tensor, as declared (tf2onnx declares nearly all) or inferred."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)  # a copy; it stops at ops it has no schema for
    except (ValueError, onnx.shape_inference.InferenceError):  # over 2 GB, or an inconsistent graph
        pass
    known = {}
    for g in _graphs(model.graph):
        known.update({t.name: t.data_type for t in g.initializer})
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type"):
                known[vi.name] = vi.type.tensor_type.elem_type
    return known


def unknown_ops(model) -> list[str]:
    """The op types of nodes in the ONNX domains that onnx's schema registry does not define at the
    model's opset: ONNX Runtime refuses a graph holding any of them as invalid."""
    import onnx

    opsets = {o.domain or "": o.version for o in model.opset_import}

    def known(n) -> bool:
        domain = "" if n.domain == "ai.onnx" else n.domain
        return domain in opsets and onnx.defs.has(n.op_type, opsets[domain], domain)

    nodes = (n for g in _graphs(model.graph) for n in g.node)
    return sorted({n.op_type for n in nodes if n.domain in ONNX_DOMAINS and not known(n)})


def refuse_unknown_ops(model) -> None:
    """tf2onnx copies a TensorFlow op it cannot convert (Lgamma, Erfinv...) into the graph under its
    TensorFlow name and only logs it: refuse such a graph here, naming the ops, rather than let ONNX
    Runtime refuse it later as an invalid model."""
    unknown = unknown_ops(model)
    if unknown:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        raise UnsupportedOpError(f"tf2onnx left TensorFlow ops in the graph that are not ONNX ops (opset {opset}): "
                                 f"{', '.join(unknown)}", hint="build for a TFLite target (arm-cpu, rpi5), or replace "
                                 "the layers that use these ops")


_GENERATED = re.compile(r"^(.*)__\d+(:\d+)?$")


def canonical_names(model) -> int:
    """Renumber tf2onnx's generated names (`Transpose__30`, `const_axes__24:0`) in graph order.
    tf2onnx numbers them from a counter whose order varies between processes, so the same model
    converted twice gave different bytes: builds would not be reproducible and a rebuilt fp32
    model could not be recognised as the one a report timed. Returns how many names changed."""
    g = model.graph
    if any(a.HasField("g") or len(a.graphs) for n in g.node for a in n.attribute):
        return 0  # subgraphs read outer names: leave such graphs as they are
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    consts = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            m = _GENERATED.match(name)
            if not m:
                return name
            # constants tf2onnx merged by value keep either name: call them by position instead
            base = "const" if name in consts else m.group(1)
            mapping[name] = f"{base}__{len(mapping)}{m.group(2) or ''}"
        return mapping[name]

    for n in g.node:  # numbered in node order, the one order tf2onnx keeps stable
        n.name = new(n.name)
        n.input[:] = [new(x) for x in n.input]
        n.output[:] = [new(x) for x in n.output]
    first_use = {x: i for i, n in reversed(list(enumerate(g.node))) for x in n.input}
    inits = sorted(g.initializer, key=lambda t: (first_use.get(new(t.name), len(g.node)), new(t.name)))
    renamed = []
    for t in inits:
        c = type(t)()
        c.CopyFrom(t)
        c.name = new(t.name)
        renamed.append(c)
    del g.initializer[:]
    g.initializer.extend(renamed)
    for vi in g.value_info:
        vi.name = new(vi.name)
    return sum(k != v for k, v in mapping.items())


def _rename_outputs(model, names: list[str]) -> None:
    """Give graph outputs the source signature's names (tf2onnx uses 'Identity:0' etc.)."""
    from onnx import helper

    g = model.graph
    for out, name in zip(list(g.output), names):
        if out.name == name:
            continue
        g.node.append(helper.make_node("Identity", [out.name], [name], name=f"edgepack_out_{name}"))
        out.name = name


def sanitize(model) -> list[str]:
    """Make a graph every tool here accepts; returns what was changed.

    - Graph inputs that are initializers (older exporters list them) or that no node reads
      (tf2onnx turns variables it folded away, e.g. a Normalization layer's mean and variance,
      into dangling inputs) are dropped: ONNX Runtime would otherwise demand them as feeds.
    - Nodes without names get one: quantizers and fp16 block lists address nodes by name.
    - Constant nodes become initializers: ORT's fp16 converter keeps a blocked node's
      initializers in fp32 but mishandles blocked Constant nodes (PaddleOCR's exports hold a
      BatchNormalization's mean and variance, ~15,000 apiece, in Constant nodes)."""
    import onnx

    g = model.graph
    init = {i.name for i in g.initializer}
    used = _read_names(g) | {o.name for o in g.output}
    changes = []
    for vi in list(g.input):
        if vi.name in init or vi.name not in used:
            g.input.remove(vi)
            changes.append(f"dropped graph input {vi.name!r} ({'an initializer' if vi.name in init else 'unused'})")
    outputs = {o.name for o in g.output}
    folded = 0
    for n in list(g.node):
        if (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1
                and n.attribute[0].name == "value" and n.output[0] not in outputs):
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            g.node.remove(n)
            folded += 1
    if folded:
        changes.append(f"{folded} Constant nodes made initializers")
    names = {n.name for n in g.node if n.name}
    for i, n in enumerate(g.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in names:
                name += "_"
            n.name = name
            names.add(name)
    return changes


def _read_names(graph) -> set[str]:
    """Every name a node reads, in subgraphs too (If/Loop bodies read outer-scope tensors)."""
    return {x for g in _graphs(graph) for n in g.node for x in n.input}


def remove_symbolic_leftovers(*, since: float) -> None:
    """ORT's SymbolicShapeInference, when it gives up, dumps sym_shape_infer_temp.onnx and a
    <uuid>.data file into the current directory. Remove exactly those (and only if just made)."""
    import onnx

    dump = Path("sym_shape_infer_temp.onnx")
    if not dump.is_file() or dump.stat().st_mtime < since - 1:
        return
    try:
        model = onnx.load(str(dump), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and "/" not in entry.value:
                    Path(entry.value).unlink(missing_ok=True)
    finally:
        dump.unlink(missing_ok=True)


def intermediates(model, samples: list[dict]) -> dict[str, np.ndarray]:
    """Every node output of `model` (a ModelProto) on `samples`, stacked on a new axis 0."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        if n.op_type in ("Constant", "QuantizeLinear"):  # constants and raw integers say nothing
            continue
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(helper.ValueInfoProto(name=o))
                have.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as written
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds_names = {i.name for i in sess.get_inputs()}
    if not samples:
        return {}
    # The first sample fixes each tensor's shape; ORT then writes the other samples' tensors straight
    # into their rows of the stacked arrays (a detector's hundreds of MB of feature maps were
    # otherwise allocated twice, by ORT and by np.stack: a third of the analysis' time).
    out = {}
    for name, v in zip(names, sess.run(names, _feeds(samples[0], feeds_names))):
        if isinstance(v, np.ndarray) and v.dtype != object:
            out[name] = np.empty((len(samples),) + v.shape, v.dtype)
            out[name][0] = v
    bound = True
    for i, feeds in enumerate(samples[1:], 1):
        if bound:
            try:
                io = sess.io_binding()
                for k, v in _feeds(feeds, feeds_names).items():
                    io.bind_cpu_input(k, np.ascontiguousarray(v))
                for name in names:
                    row = out[name][i] if name in out else None
                    if row is None:
                        io.bind_output(name, "cpu")
                    else:
                        io.bind_output(name, "cpu", 0, row.dtype, list(row.shape), row.ctypes.data)
                sess.run_with_iobinding(io)
                continue
            except Exception:  # a tensor whose shape depends on the sample: plain runs from here on
                bound = False
        for name, v in zip(names, sess.run(names, _feeds(feeds, feeds_names))):
            if name in out:
                if isinstance(v, np.ndarray) and v.shape == out[name].shape[1:]:
                    out[name][i] = v
                else:  # not the same shape in every sample: it cannot be stacked
                    del out[name]
    return out


def _feeds(sample: dict, names: set) -> dict:
    return {k: v for k, v in sample.items() if k in names}


