"""onnx2tf's first step, lean: it runs the whole ONNX graph in ONNX Runtime and keeps every node's
output for the rest of the conversion (op converters compare against them). Its own way holds the
weights four more times (a graph-surgeon copy, an exported copy, its bytes, the session) and every
output twice (ONNX Runtime's and NumPy's): MPNet at 384 tokens, 1.7 GB of copies and 0.9 GB of
outputs on top of what onnx2tf already holds.

`lean(folder)` swaps that step for the conversion's duration. onnx2tf's function still runs (its
input data, its output list, its graph edits are its own), given a copy of the graph whose weights
carry no bytes, and an ONNX Runtime in which the session takes those weights as inputs, fed at run
time from one copy (no prepacked second one), and the run writes its outputs a few at a time to .npy
files in `folder`, handed back mapped read-only: the conversion reads the ones it compares, page by page."""
from __future__ import annotations

import contextlib
import itertools
import sys
from pathlib import Path

import numpy as np

from packager.formats.onnx_rewrite import without

CHUNK_BYTES = 256 << 20  # outputs per run: the run's own copies of them are this big at most
HELD_BYTES = 1 << 12  # initializers this big are fed to the session at run time; smaller ones stay in the graph


@contextlib.contextmanager
def lean(folder: Path, then=lambda: None):
    """onnx2tf's dummy inference, lean, while the block runs (`folder`: where the outputs go; `then`
    runs after it: the trim that gives its transient memory back)."""
    o2t = sys.modules["onnx2tf.onnx2tf"]
    functions = sys.modules["onnx2tf.utils.common_functions"]
    dummy = o2t.dummy_onnx_inference

    names = itertools.count()  # the outputs' files, unique for the whole block

    def run(*args, onnx_graph, **kwargs):
        runtime = functions.ort
        functions.ort = shim = _Runtime(runtime, _held(onnx_graph), folder, then, names)
        try:
            return dummy(*args, onnx_graph=without(onnx_graph, shim.held, marked=False), **kwargs)
        except Exception as e:  # onnx2tf would go on without the outputs: then its own way, as before
            print(f"edgepack: the lean dummy run failed ({type(e).__name__}: {str(e)[:200]}); onnx2tf's own runs")
        finally:
            functions.ort = runtime
            then()
        return dummy(*args, onnx_graph=onnx_graph, **kwargs)

    o2t.dummy_onnx_inference = run
    try:
        yield
    finally:
        o2t.dummy_onnx_inference = dummy


# What ONNX Runtime takes as a NumPy input (bfloat16, float8... stay in the graph).
_FED = frozenset({1, 2, 3, 5, 6, 7, 10, 11})  # FLOAT, UINT8, INT8, INT16, INT32, INT64, FLOAT16, DOUBLE


def _held(model) -> dict:
    """The initializers fed at run time; none in a graph with subgraphs (a subgraph may read an outer
    initializer by name, which graph surgeon then exports into it, bytes and all)."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        return {}
    return {t.name: t for t in model.graph.initializer
            if t.data_type in _FED and t.HasField("raw_data") and t.ByteSize() >= HELD_BYTES}


class _Runtime:
    """onnxruntime as common_functions sees it during the dummy run: the same module but for
    InferenceSession."""

    def __init__(self, ort, held: dict, folder: Path, trim, names):
        self._ort, self.held, self._folder, self._trim, self._names = ort, held, folder, trim, names

    def __getattr__(self, name):
        return getattr(self._ort, name)

    def InferenceSession(self, path_or_bytes, sess_options=None, providers=None, **kwargs):  # noqa: N802 (its name)
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load_model_from_string(path_or_bytes)  # small: the weights carry no bytes
        inits = [t for t in model.graph.initializer if t.name not in self.held]
        fed = [t.name for t in model.graph.initializer if t.name in self.held]  # graph surgeon drops unused ones
        for t in model.graph.initializer:
            if t.name in self.held:
                model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        opts = sess_options or self._ort.SessionOptions()
        opts.enable_cpu_mem_arena = False  # an arena keeps the biggest run's memory for good

        def session(outputs):
            """A session of the graph with just these outputs: ONNX Runtime keeps every graph
            output of a run until its end, asked for or not."""
            del model.graph.output[:]
            model.graph.output.extend(outputs)
            return self._ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers,
                                              **kwargs)

        weights = {name: numpy_helper.to_array(self.held[name]) for name in fed}
        return _Session(session, list(model.graph.output), weights, self._folder, self._trim, self._names)


class _Session:
    def __init__(self, session, outputs: list, weights: dict, folder: Path, trim, names):
        self._session, self._outputs, self._weights = session, outputs, weights
        self._folder, self._trim, self._names = folder, trim, names

    def __getattr__(self, name):  # what else onnx2tf asks of a session, from one with every output
        return getattr(self._session(self._outputs), name)

    def run(self, names, feeds, *args):
        """The outputs `names` (None: all), computed a chunk at a time, each saved and mapped back."""
        meta = {o.name: o for o in self._outputs}
        names = list(meta) if names is None else list(names)
        feeds = dict(feeds, **self._weights)
        self._folder.mkdir(parents=True, exist_ok=True)
        out, chunk, size = {}, [], 0
        for i, name in enumerate(names):
            chunk.append(name)
            size += _bytes(meta[name])
            if size >= CHUNK_BYTES or i == len(names) - 1:
                values = self._session([meta[n] for n in chunk]).run(chunk, feeds, *args)
                for n, value in zip(chunk, values):
                    if not isinstance(value, np.ndarray) or value.dtype.hasobject:  # strings, sequences: as they are
                        out[n] = value
                        continue
                    path = self._folder / f"out-{next(self._names)}.npy"
                    np.save(path, value)
                    out[n] = np.load(path, mmap_mode="r")
                chunk, size, values = [], 0, None
                self._trim()  # the chunk's arrays, freed, are heap glibc keeps otherwise
        return [out[n] for n in names]


def _bytes(info) -> int:
    """An output's size from its ValueInfoProto (an unknown dimension counts as 1)."""
    from onnx import helper

    n = 1
    for d in info.type.tensor_type.shape.dim:
        n *= d.dim_value or 1
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):  # no type recorded
        return n * 4
