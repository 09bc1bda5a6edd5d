"""A canonical layout for the .tflite files a bundle ships, so that delta updates stay small.

A delta update fetches the content-defined chunks of the new bundle that the device does not hold
(edgebundle/cdc.py), so every unchanged tensor must be written as the same bytes in every version.
The TFLite converter does not do that: it orders the buffers (the constant tensors' bytes) by its
own traversal and tensor names, which change between versions where no weight changed (MobileNetV2
int8, head retrained: 67 of 70 buffers identical, 66 of them at another index), and the flatbuffer
shares one vtable among many tables through offsets that span everything written between them.
Each of those breaks costs a couple of chunks (docs/benchmarks.md, delta_updates).

Here the model is written again with:
- its buffers in graph order: by the first operator (execution order, then input slot) that reads
  the tensor, not by name; metadata buffers after them by metadata name; the rest by content
  (sha256). A retrained layer's weights stay where they were, so nothing around them moves;
- its quantization parameters (per-channel scales and zero points, 0.4 MB of a MobileNetV2 int8)
  written once per distinct value, in the same graph order, ahead of the tensor tables (inline,
  they would sit between tables whose offsets shift with any added tensor);
- a vtable next to every table (none shared across the file).
Operators, tensors and signatures are written back as they were read, and every index naming a
buffer is remapped, so the model computes exactly what it did (tests/test_tflite_layout.py).

Left as they are: models with buffers outside the flatbuffer (offset/size: over 2 GB) and models
with custom ops other than TF Select (Flex), whose kernels live outside this runtime and cannot be
checked here. An Edge TPU compiled model is never given to this (edgetpu.py ships the compiler's
file)."""
from __future__ import annotations

import hashlib

import numpy as np

from packager.tflite_fb import op_names, read_model, schema as fb_schema

ALIGN = 16  # the converter's alignment for buffer data (schema: force_align: 16)
_LAST = (1 << 31,)


def canonical(data: bytes) -> tuple[bytes, str | None]:
    """(the model in canonical layout, None), or (`data` unchanged, why it was left as it is)."""
    model = read_model(data)
    why = unsupported(model)
    if why:
        return data, why
    rank = _graph_order(model)
    keys = _buffer_keys(model, rank)
    order = [0] + sorted(range(1, len(model.buffers)), key=keys.__getitem__)
    new_index = {old: new for new, old in enumerate(order)}
    model.buffers = [_Aligned(model.buffers[i]) for i in order]
    for t in _tensors(model):
        t.buffer = new_index[t.buffer]
    for m in model.metadata or []:
        m.buffer = new_index[m.buffer]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [new_index[int(i)] for i in model.metadataBuffer]
    return _serialize(model, rank), None


def unsupported(model) -> str | None:
    """Why the model cannot be written again here (buffers outside the flatbuffer, custom ops), or None."""
    if model.externalBuffers or model.externalBufferGroups or any(b.offset > 1 for b in model.buffers or []):
        return "its buffers are stored outside the flatbuffer"
    if not model.buffers or _size(model.buffers[0]):
        return "its buffer 0 is not the empty buffer"
    names = op_names()
    custom = sorted({(c.customCode or b"").decode() for c in model.operatorCodes or []
                     if names.get(max(c.builtinCode, c.deprecatedBuiltinCode)) == "CUSTOM"})
    custom = [c for c in custom if not c.startswith("Flex")]
    return f"it has custom ops ({', '.join(custom)})" if custom else None


def _tensors(model) -> list:
    return [t for g in model.subgraphs or [] for t in g.tensors or []]


def _graph_order(model) -> dict[int, tuple]:
    """Each tensor (by id of its object) -> where the graph first uses it: (subgraph, operator,
    inputs/outputs/intermediates, slot), the subgraph's inputs first. Independent of tensor names."""
    rank: dict[int, tuple] = {}
    for s, g in enumerate(model.subgraphs or []):
        uses = [(-1, 0, list(g.inputs if g.inputs is not None else []))]
        for k, op in enumerate(g.operators or []):
            for kind, idx in enumerate((op.inputs, op.outputs, op.intermediates)):
                uses.append((k, kind, list(idx if idx is not None else [])))
        for k, kind, idx in uses:
            for slot, i in enumerate(idx):
                if i >= 0:
                    rank.setdefault(id(g.tensors[i]), (s, k, kind, slot))
    return rank


def _buffer_keys(model, rank: dict[int, tuple]) -> list[tuple]:
    """Each buffer's sort key: the graph order of its first tensor; then metadata by name; then content."""
    first: dict[int, tuple] = {}
    for t in _tensors(model):
        first[t.buffer] = min(first.get(t.buffer, _LAST), rank.get(id(t), _LAST))
    meta: dict[int, bytes] = {}
    for m in model.metadata or []:
        meta[m.buffer] = min(meta.get(m.buffer, m.name), m.name)
    keys = []
    for i, buf in enumerate(model.buffers):
        if first.get(i, _LAST) != _LAST:
            keys.append((0, first[i], _digest(buf)))
        else:
            keys.append((1, meta[i], _digest(buf)) if i in meta else (2, (), _digest(buf)))
    return keys


def _size(buf) -> int:
    return 0 if buf.data is None else len(buf.data)


def _digest(buf) -> bytes:
    return hashlib.sha256(bytes(buf.data)).digest() if _size(buf) else b""


class _Aligned(fb_schema().BufferT):
    """A buffer whose data is 16-byte aligned, as the converter writes it (the object API: 4)."""

    def __init__(self, buf):
        super().__init__()
        self.data, self.offset, self.size = buf.data, buf.offset, buf.size

    def Pack(self, builder):  # noqa: N802 (the flatbuffers object API's name)
        fb = fb_schema()
        data = None
        if self.data is not None:
            raw = bytes(self.data)
            builder.StartVector(1, len(raw), ALIGN)
            builder.head -= len(raw)
            builder.Bytes[builder.head:builder.head + len(raw)] = raw
            data = builder.EndVector()
        fb.BufferStart(builder)
        if data is not None:
            fb.BufferAddData(builder, data)
        fb.BufferAddOffset(builder, self.offset)
        fb.BufferAddSize(builder, self.size)
        return fb.BufferEnd(builder)


class _Packed:
    """An object already in the builder: what its parent table's Pack links to."""

    def __init__(self, offset: int):
        self.offset = offset

    def Pack(self, builder) -> int:  # noqa: N802
        return self.offset


class _Unshared(dict):
    """The builder's table of written vtables, kept empty so that every table gets its own vtable
    next to it: a shared one is reached by an offset spanning everything written in between."""

    def get(self, key, default=None):
        return default

    def __setitem__(self, key, value):
        pass


def _quantization_first(model, builder, rank: dict[int, tuple]) -> None:
    """Write each distinct quantization table once, in graph order, before anything links to it."""
    tensors = sorted((t for t in _tensors(model) if t.quantization is not None),
                     key=lambda t: rank.get(id(t), _LAST))
    packed: dict[bytes, _Packed] = {}
    for t in tensors:
        key = _quant_key(t.quantization)
        if key not in packed:
            packed[key] = _Packed(t.quantization.Pack(builder))
        t.quantization = packed[key]


def _quant_key(q) -> bytes:
    shared = q.details is None  # custom quantization details: never shared
    h = hashlib.sha256(repr((q.quantizedDimension, q.detailsType, shared or id(q))).encode())
    for v in (q.min, q.max, q.scale, q.zeroPoint):
        h.update(b"-" if v is None else np.asarray(v).dtype.str.encode() + b":" + np.asarray(v).tobytes())
    return h.digest()


def _serialize(model, rank: dict[int, tuple]) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.vtables = _Unshared()
    _quantization_first(model, builder, rank)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
