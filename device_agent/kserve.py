"""KServe v2 / Open Inference Protocol REST codec: JSON tensors and the binary tensor
data extension that Triton's tritonclient.http uses by default."""
from __future__ import annotations

import json

import numpy as np

from device_agent.model import InferenceError

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_BY_DTYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}
HEADER_LEN = "Inference-Header-Content-Length"


def datatype(dtype: str) -> str:
    return _BY_DTYPE.get(np.dtype(dtype).name, "FP32")


def tensor_meta(spec) -> dict:
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": list(spec.shape_signature or spec.shape)}


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray], list[dict]]:
    """-> (request JSON, input arrays by name, requested outputs)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InferenceError(f"{HEADER_LEN} {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise InferenceError(f"{HEADER_LEN} {n} does not fit a body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InferenceError(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise InferenceError("request must be a JSON object with a non-empty 'inputs' list")
    arrays, offset = {}, 0
    for t in req["inputs"]:
        if not isinstance(t, dict) or not {"name", "shape", "datatype"} <= set(t):
            raise InferenceError("each input needs 'name', 'shape' and 'datatype'")
        name, dt = t["name"], t["datatype"]
        if dt not in DATATYPES:
            raise InferenceError(f"input {name!r}: unknown datatype {dt!r}; one of {sorted(DATATYPES)}")
        try:
            shape = [int(d) for d in t["shape"]]
        except (TypeError, ValueError):
            raise InferenceError(f"input {name!r}: shape must be a list of integers") from None
        if any(d < 0 for d in shape):
            raise InferenceError(f"input {name!r}: negative dimension in shape {shape}")
        count = int(np.prod(shape)) if shape else 1
        params = t.get("parameters") or {}
        if "binary_data_size" in params:
            size = int(params["binary_data_size"])
            if offset + size > len(binary):
                raise InferenceError(f"input {name!r}: binary data runs past the end of the body")
            arr = np.frombuffer(binary[offset:offset + size], dtype=DATATYPES[dt])
            offset += size
        else:
            if "data" not in t:
                raise InferenceError(f"input {name!r} has no 'data'")
            try:
                arr = np.asarray(t["data"], dtype=DATATYPES[dt])
            except (TypeError, ValueError) as e:
                raise InferenceError(f"input {name!r}: data does not fit datatype {dt}: {e}") from None
        if arr.size != count:
            raise InferenceError(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
        arrays[name] = arr.reshape(shape)
    outputs = req.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise InferenceError("'outputs' must be a list of {\"name\": ...} objects")
    return req, arrays, outputs


def encode_response(*, model: str, version: str, req: dict, results: dict[str, np.ndarray],
                    requested: list[dict]) -> tuple[bytes, dict]:
    """-> (body, extra headers). Outputs asked for with binary_data go after the JSON header."""
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    wanted = requested or [{"name": n} for n in results]
    outs, blobs = [], []
    for o in wanted:
        name = o["name"]
        if name not in results:
            raise InferenceError(f"unknown output {name!r}; the model has {sorted(results)}")
        arr = np.ascontiguousarray(results[name])
        entry = {"name": name, "datatype": datatype(arr.dtype.name), "shape": list(arr.shape)}
        if (o.get("parameters") or {}).get("binary_data", default_binary):
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outs.append(entry)
    resp = {"model_name": model, "model_version": version, "outputs": outs}
    if "id" in req:
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {HEADER_LEN: str(len(head)), "Content-Type": "application/octet-stream"}
