"""Length buckets of a TFLite text model as signatures of one file (packager/sequence.py: share_weights):
each bucket's graph a subgraph of the main model's flatbuffer, every constant buffer stored once."""
from __future__ import annotations

from packager.formats.tflite_layout import unsupported
from packager.tflite_fb import read_model, schema as fb_schema, write_model


def merge_signatures(main: bytes, others: dict[str, bytes]) -> tuple[bytes, dict[str, int]] | None:
    """One .tflite holding `main` (its subgraph stays the first, its signature the default) and each of
    `others` as a further signature under its key, every constant buffer with the same bytes stored once:
    a text model's length buckets share one copy of the weights. Returns the model and the weight bytes
    each key could not share; None when a model is not one subgraph with one signature (control flow) or
    keeps its weights outside the flatbuffer (over 2 GB): left as they are."""
    import hashlib

    fb = fb_schema()

    def mergeable(m) -> bool:  # one graph, one signature, and what the canonical layout can write
        return len(m.subgraphs or ()) == 1 and len(m.signatureDefs or ()) == 1 and unsupported(m) is None

    merged = read_model(main)
    if not mergeable(merged) or "serving_default" in others:
        return None
    merged.signatureDefs[0].signatureKey = "serving_default"  # the main graph: what a runtime picks by name
    seen: dict[bytes, int] = {}
    for i, buf in enumerate(merged.buffers):
        if buf.data is not None and len(buf.data):
            seen.setdefault(hashlib.sha256(bytes(buf.data)).digest(), i)
    codes = {_code_key(oc): i for i, oc in enumerate(merged.operatorCodes)}
    own = {}
    for key, data in others.items():
        m = read_model(data)
        if not mergeable(m):
            return None
        own[key], buffers = 0, {0: 0}  # buffer 0 is the schema's empty sentinel in every model
        for i, buf in enumerate(m.buffers[1:], 1):
            if buf.data is None or not len(buf.data):
                buffers[i] = _append(merged.buffers, fb.BufferT())  # a tensor's own empty buffer, as converters write
                continue
            digest = hashlib.sha256(bytes(buf.data)).digest()
            if digest not in seen:
                seen[digest] = _append(merged.buffers, buf)
                own[key] += len(buf.data)
            buffers[i] = seen[digest]
        ops = {}
        for i, oc in enumerate(m.operatorCodes):
            if _code_key(oc) not in codes:
                codes[_code_key(oc)] = _append(merged.operatorCodes, oc)
            ops[i] = codes[_code_key(oc)]
        sub = m.subgraphs[0]
        for t in sub.tensors:
            t.buffer = buffers[t.buffer]
        for op in sub.operators:
            op.opcodeIndex = ops[op.opcodeIndex]
        sig = m.signatureDefs[0]
        sig.signatureKey, sig.subgraphIndex = key, len(merged.subgraphs)
        merged.subgraphs.append(sub)
        merged.signatureDefs.append(sig)
    return write_model(merged), own


def _code_key(oc) -> tuple:
    return oc.builtinCode, oc.deprecatedBuiltinCode, oc.customCode, oc.version


def _append(items: list, item) -> int:
    items.append(item)
    return len(items) - 1
