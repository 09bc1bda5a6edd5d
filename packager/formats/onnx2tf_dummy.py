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
import sys
from pathlib import Path

import numpy as np

from packager.formats.onnx_rewrite import without

CHUNK_BYTES = 128 << 20  # outputs per run: the run's own copies of them are this big at most
HELD_BYTES = 1 << 12  # initializers this big are fed to the session at run time; smaller ones stay in the graph


@contextlib.contextmanager
def lean(folder: Path, then=lambda: None):
    """onnx2tf's dummy inference, lean, while the block runs (`folder`: where the outputs go; `then`
    runs after it: the trim that gives its transient memory back)."""
    o2t = sys.modules["onnx2tf.onnx2tf"]
    functions = sys.modules["onnx2tf.utils.common_functions"]
    dummy = o2t.dummy_onnx_inference

    def run(*args, onnx_graph, **kwargs):
        held = {t.name: t for t in onnx_graph.graph.initializer
                if t.HasField("raw_data") and t.ByteSize() >= HELD_BYTES}
        runtime = functions.ort
        functions.ort = _Runtime(runtime, held, folder, then)
        try:
            return dummy(*args, onnx_graph=without(onnx_graph, held, marked=False), **kwargs)
        finally:
            functions.ort = runtime
            then()

    o2t.dummy_onnx_inference = run
    try:
        yield
    finally:
        o2t.dummy_onnx_inference = dummy


class _Runtime:
    """onnxruntime as common_functions sees it during the dummy run: the same module but for
    InferenceSession."""

    def __init__(self, ort, held: dict, folder: Path, trim):
        self._ort, self._held, self._folder, self._trim = ort, held, folder, trim

    def __getattr__(self, name):
        return getattr(self._ort, name)

    def InferenceSession(self, path_or_bytes, sess_options=None, providers=None, **kwargs):  # noqa: N802 (its name)
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load_model_from_string(path_or_bytes)  # small: the weights carry no bytes
        inits = [t for t in model.graph.initializer if t.name not in self._held]
        for t in model.graph.initializer:
            if t.name in self._held:
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

        weights = {name: numpy_helper.to_array(t) for name, t in self._held.items()}
        return _Session(session, list(model.graph.output), weights, self._folder, self._trim)


class _Session:
    def __init__(self, session, outputs: list, weights: dict, folder: Path, trim):
        self._session, self._outputs, self._weights = session, outputs, weights
        self._folder, self._trim = folder, trim

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
                    path = self._folder / f"out-{len(out)}.npy"
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
