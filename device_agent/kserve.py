"""KServe v2 / Open Inference Protocol REST codec: JSON tensors and the binary tensor
data extension that Triton's tritonclient.http uses by default.

Requests come from untrusted clients: every field is checked for its type and range here, and
anything wrong is an InferenceError (400) naming the field, never an exception from deeper down.
Responses are strict JSON: a NaN/Inf output value is written as null (numpy and tritonclient
read null back as NaN); binary outputs carry the raw values."""
from __future__ import annotations

import json
import math

import numpy as np

from device_agent.model import InferenceError
from edgebundle.jsonsafe import JsonError, loads

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_BY_DTYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}
BYTES = "BYTES"  # text: JSON strings, or (binary extension) each element a 4-byte little-endian length + UTF-8
HEADER_LEN = "Inference-Header-Content-Length"
MAX_DEPTH = 40  # nesting of the JSON header: tensors nest `data` lists by rank
MAX_RANK = 32
MAX_ELEMENTS = 1 << 28
MAX_TENSORS = 64


def datatype(dtype: str) -> str:
    return _BY_DTYPE.get(np.dtype(dtype).name, "FP32")


def tensor_meta(spec, dtype: str | None = None) -> dict:
    """A tensor as the API takes or answers it: `dtype` (Model.api_dtypes) where that differs from the
    model file's (an int8-I/O bundle takes and returns float32)."""
    return {"name": spec.name, "datatype": datatype(dtype or spec.dtype),
            "shape": list(spec.shape_signature or spec.shape)}


TEXT_META = {"name": "text", "datatype": BYTES, "shape": [-1]}  # text bundles also take text in place of tokens


def model_config(model) -> dict:
    """Triton's model configuration (GET /v2/models/NAME/config, tritonclient's get_model_config):
    the batch axis is part of `dims` (max_batch_size 0: requests carry whole tensors)."""
    man = model.manifest

    def io(spec) -> dict:
        return {"name": spec.name, "data_type": f"TYPE_{datatype(model.api_dtypes.get(spec.name, spec.dtype))}",
                "dims": list(spec.shape_signature or spec.shape)}

    return {"name": model.name, "platform": f"{man.format}_{model.runtime.details.get('runtime')}",
            "backend": str(model.runtime.details.get("runtime")), "max_batch_size": 0,
            "version_policy": {"specific": {"versions": [model.version]}},
            "input": [io(t) for t in man.inputs], "output": [io(t) for t in man.outputs],
            "parameters": {k: {"string_value": str(v)} for k, v in (
                ("precision", man.precision), ("target", man.target.get("name")), ("bundle_sha256", model.bundle_sha256))}}


def model_stats(rows) -> dict:
    """Triton's statistics extension (GET /v2/models[/NAME]/stats, get_inference_statistics) from
    the agent's per-(model, version) counters: counts and cumulative nanoseconds."""
    def pair(count: int, us: int) -> dict:
        return {"count": int(count), "ns": int(us) * 1000}

    return {"model_stats": [{
        "name": name, "version": version, "last_inference": c.last_ms, "inference_count": c.inferences,
        "execution_count": c.executions,
        "inference_stats": {"success": pair(c.success, c.request_us), "fail": pair(c.failure, 0),
                            "queue": pair(c.success, c.queue_us), "compute_input": pair(c.success, c.input_us),
                            "compute_infer": pair(c.success, c.infer_us),
                            "compute_output": pair(c.success, c.output_us)},
        "batch_stats": []} for (name, version), c in rows]}


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray], list[dict]]:
    """-> (request JSON, input arrays by name, requested outputs). InferenceError for anything malformed."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.strip().isdigit()):
            raise InferenceError(f"{HEADER_LEN} {header_length[:40]!r} is not a number")
        n = int(header_length)
        if not 0 < n <= len(body):
            raise InferenceError(f"{HEADER_LEN} {n} does not fit a body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = loads(head, max_depth=MAX_DEPTH, allow_nan=True)
    except JsonError as e:
        raise InferenceError(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise InferenceError("request must be a JSON object with a non-empty 'inputs' list")
    if len(req["inputs"]) > MAX_TENSORS:
        raise InferenceError(f"at most {MAX_TENSORS} inputs per request")
    if "id" in req and not isinstance(req["id"], str):
        raise InferenceError("'id' must be a string")
    _params(req, "request")
    if not isinstance(_params(req, "request").get("binary_data_output", False), bool):
        raise InferenceError("parameters.binary_data_output must be true or false")
    arrays, offset = {}, 0
    for t in req["inputs"]:
        if not isinstance(t, dict) or not {"name", "shape", "datatype"} <= set(t):
            raise InferenceError("each input needs 'name', 'shape' and 'datatype'")
        name, dt = t["name"], t["datatype"]
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise InferenceError("input 'name' must be a string of 1-256 characters")
        if name in arrays:
            raise InferenceError(f"input {name!r} appears twice")
        if not isinstance(dt, str) or (dt not in DATATYPES and dt != BYTES):
            raise InferenceError(f"input {name!r}: unknown datatype {str(dt)[:20]!r}; one of "
                                 f"{sorted([*DATATYPES, BYTES])}")
        shape = _shape(name, t["shape"])
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise InferenceError(f"input {name!r}: shape {shape} has {count} elements; at most {MAX_ELEMENTS}")
        params = _params(t, f"input {name!r}")
        if dt == BYTES:
            arrays[name], offset = _strings(name, t, params, shape, binary, offset)
            continue
        dtype = np.dtype(DATATYPES[dt])
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InferenceError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise InferenceError(f"input {name!r}: binary_data_size {size} is not {count} x {dtype.itemsize} "
                                     f"bytes for shape {shape} of {dt}")
            if offset + size > len(binary):
                raise InferenceError(f"input {name!r}: binary data runs past the end of the body")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dtype)
            offset += size
        else:
            if "data" not in t:
                raise InferenceError(f"input {name!r} has no 'data'")
            arr = _json_data(name, t["data"], dtype, dt)
        if arr.size != count:
            raise InferenceError(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
        arrays[name] = arr.reshape(shape)
    outputs = req.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InferenceError("'outputs' must be a list of {\"name\": ...} objects")
    for o in outputs:
        if not isinstance(_params(o, f"output {o['name'][:64]!r}").get("binary_data", False), bool):
            raise InferenceError(f"output {o['name'][:64]!r}: parameters.binary_data must be true or false")
    return req, arrays, outputs


def _strings(name: str, t: dict, params: dict, shape: list[int], binary, offset: int) -> tuple[list[str], int]:
    """A BYTES tensor as a list of strings (rank 1: one text per element)."""
    if len(shape) != 1:
        raise InferenceError(f"input {name!r}: BYTES inputs are rank 1 (one text per element), not shape {shape}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InferenceError(f"input {name!r}: binary_data_size must be a non-negative integer within the body")
        raw, items, i = bytes(binary[offset:offset + size]), [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise InferenceError(f"input {name!r}: BYTES element {len(items)} has a truncated length prefix")
            n = int.from_bytes(raw[i:i + 4], "little")
            if i + 4 + n > len(raw):
                raise InferenceError(f"input {name!r}: BYTES element {len(items)} runs past its binary data")
            items.append(raw[i + 4:i + 4 + n])
            i += 4 + n
        offset += size
    else:
        data = t.get("data")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise InferenceError(f"input {name!r}: BYTES 'data' must be a list of strings")
        items = data
    if len(items) != shape[0]:
        raise InferenceError(f"input {name!r}: {len(items)} values for shape {shape}")
    try:
        return [x.decode("utf-8") if isinstance(x, bytes) else x for x in items], offset
    except UnicodeDecodeError as e:
        raise InferenceError(f"input {name!r}: BYTES element is not UTF-8 ({e.reason})") from None


def _params(obj: dict, what: str) -> dict:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise InferenceError(f"{what}: 'parameters' must be a JSON object")
    return p


def _shape(name: str, shape) -> list[int]:
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InferenceError(f"input {name!r}: shape must be a list of at most {MAX_RANK} integers")
    if any(d < 0 or d > MAX_ELEMENTS for d in shape):
        raise InferenceError(f"input {name!r}: dimension out of range in shape {shape}")
    return shape


def _json_data(name: str, data, dtype: np.dtype, dt: str) -> np.ndarray:
    if not isinstance(data, (list, int, float, bool)):
        raise InferenceError(f"input {name!r}: 'data' must be a list of numbers")
    try:
        if dtype.kind == "f" and dtype.itemsize < 8:  # JSON numbers are doubles: one beyond FP32/FP16 is refused
            wide = np.asarray(data, dtype=np.float64)
            top = float(np.abs(wide[np.isfinite(wide)]).max(initial=0.0))
            if top > float(np.finfo(dtype).max):
                raise InferenceError(f"input {name!r} holds {top:.3g}, beyond what {dt} holds "
                                     f"({float(np.finfo(dtype).max):.3g})")
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise InferenceError(f"input {name!r}: data does not fit datatype {dt}: {str(e)[:200]}") from None
    if arr.dtype != dtype:  # never object arrays
        raise InferenceError(f"input {name!r}: data does not fit datatype {dt}")
    return arr


def encode_response(*, model: str, version: str, req: dict, results: dict[str, np.ndarray],
                    requested: list[dict]) -> tuple[bytes, dict]:
    """-> (body, extra headers). Outputs asked for with binary_data go after the JSON header."""
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    wanted = requested or [{"name": n} for n in results]
    outs, blobs = [], []
    for o in wanted:
        name = o["name"]
        if name not in results:
            raise InferenceError(f"unknown output {name[:64]!r}; the model has {sorted(results)}")
        arr = np.ascontiguousarray(results[name])
        entry = {"name": name, "datatype": datatype(arr.dtype.name), "shape": list(arr.shape)}
        if (o.get("parameters") or {}).get("binary_data", default_binary):
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = arr.reshape(-1)
            data = flat.tolist()
            if flat.dtype.kind == "f" and not np.isfinite(flat).all():
                data = [x if math.isfinite(x) else None for x in data]
            entry["data"] = data
        outs.append(entry)
    resp = {"model_name": model, "model_version": version, "outputs": outs}
    if "id" in req:
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {HEADER_LEN: str(len(head)), "Content-Type": "application/octet-stream"}
