"""TFLiteConverter over a SavedModel edgepack wrote itself (onnx2tf's, one `serving_default` signature),
reading it once.

`TFLiteConverter.from_saved_model` loads the SavedModel in Python twice and imports its graph once more
before the converter's C++ reads it again; onnx2tf stores the weights as constants in saved_model.pb,
so each of those is a full copy of the weights. Then the Python side turns the result into objects
twice more (conversion metadata, buffer deduplication). For MPNet (442 MB of fp32 weights, a 520 MB
saved_model.pb) that is a 5.9 GB peak and 27 s; this converter lets the C++ importer read the
directory alone, writes no conversion metadata and deduplicates buffers only when two are the same:
4.0 GB and 13 s, and the same model (every op, tensor and buffer equal). The SavedModel onnx2tf's
child now writes keeps the weights as variables (onnx2tf_worker._write_saved_model): a 1 MB
saved_model.pb, the weights read from the checkpoint as the importer freezes them: 2.2 GB for
dynamic range, 3.1 GB for fp32 (was 4.1 and 4.6).

Only for SavedModels with the one signature: a user's SavedModel goes through from_saved_model,
which converts every signature it has.

`converter` sets either up for a mode; tflite.py runs it in its own process, or in a child
(tflite_worker's `convert` step) for a SavedModel of CHILD_BYTES or more."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

# A SavedModel this big converts in a child of its own: the process that converts keeps most of the
# converter's memory after it (MPNet: RSS 3.5 GB after converting in a fresh 0.6 GB process).
CHILD_BYTES = 256 << 20


def saved_model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def converter(saved_model: str, mode: str, *, allow_flex: bool, lean_import: bool):
    """A TFLiteConverter set up for `mode` (lean_import: `lean`, for a SavedModel edgepack wrote)."""
    import tensorflow as tf

    conv = lean(saved_model) if lean_import else tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if allow_flex:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    if mode in ("fp16", "dynamic"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    return conv


def lean(saved_model: str):
    """A converter for `saved_model`, set up as from_saved_model sets it up; set options, call convert()."""
    from tensorflow.core.framework import graph_pb2
    from tensorflow.lite.python import lite

    class Lean(lite.TFLiteSavedModelConverterV2):
        def __init__(self, path: str):
            lite.TFLiteConverterBaseV2.__init__(self)  # not the parent's: it parses the SavedModel in Python
            self.saved_model_dir = path
            self._saved_model_tags = {"serve"}
            self._saved_model_exported_names = ["serving_default"]
            self._saved_model_version = 1
            self._trackable_obj = None
            self.exclude_conversion_metadata = True

        @lite._export_metrics
        def convert(self):
            self._debug_info = None
            # the GraphDef is read only for statistics and to spot fake-quant nodes, which onnx2tf never writes
            return self._convert_from_saved_model(graph_pb2.GraphDef())

        def _optimize_tflite_model(self, model, *args, **kwargs):
            on = self._experimental_use_buffer_offset
            self._experimental_use_buffer_offset = True  # past the C++ step this only skips deduplication
            try:
                model = super()._optimize_tflite_model(model, *args, **kwargs)
            finally:
                self._experimental_use_buffer_offset = on
            return lite._deduplicate_readonly_buffers(model) if not on and has_duplicates(model) else model

    return Lean(saved_model)


def has_duplicates(data: bytes) -> bool:
    """Whether two of the model's buffers hold the same bytes (read in place, no copies)."""
    from packager.tflite_fb import schema

    model = schema().Model.GetRootAsModel(data, 0)
    by_size = defaultdict(list)
    for i in range(model.BuffersLength()):
        size = model.Buffers(i).DataLength()
        if size:
            by_size[size].append(i)
    for same in by_size.values():
        if len(same) < 2:  # a size only one buffer has cannot repeat
            continue
        seen = set()
        for i in same:
            digest = hashlib.blake2b(model.Buffers(i).DataAsNumpy().data, digest_size=16).digest()
            if digest in seen:
                return True
            seen.add(digest)
    return False
