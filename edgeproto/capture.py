"""Data capture pulls (`edgepack.capture-request/1`): the fleet asks one device for the real requests
it captured (docs/ota.md#data-capture), and the device sends them back as one `.npz` file.

    fleet -> {root}/devices/{id}/capture/request   the request (QoS 1, not retained; signed like a
                                                    desired record when the device has trusted keys)
    agent -> {root}/devices/{id}/capture/result    accepted / done / refused / failed (QoS 1)
    agent -> {root}/devices/{id}/capture/data/{request_id}/chunks/{i}   the file, retained chunks

The file travels the way bundles travel to devices, the other way round: fixed-size chunks, each
with its sha256 in the result, and the whole file's sha256 and size; the fleet clears the retained
chunks once it has checked them. Standard library only (agents import it)."""
from __future__ import annotations

from dataclasses import dataclass

from edgeproto.records import JobState
from edgeproto.bundleref import (MODEL_NAME, TARGET, Limits, MqttTransfer, checked, fixed_chunks, integer, issued,
                                 load_record, record_id, signature)

SCHEMA = "edgepack.capture-request/1"
MAX_SAMPLES = 100_000
FINAL = (JobState.DONE, JobState.REFUSED, JobState.FAILED)


@dataclass(frozen=True)
class CaptureRequest:
    """Send up to `max_samples` of the newest captured samples of `model` (None: the device's first
    model); `clear` deletes them from the device once the broker holds the file."""

    request_id: str
    target: str  # "devices/{id}"
    model: str | None = None
    max_samples: int = 1000
    clear: bool = False
    issued: str | None = None
    signature: dict | None = None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "request_id": self.request_id, "target": self.target, "model": self.model,
                "max_samples": self.max_samples, "clear": self.clear, "issued": self.issued}

    @classmethod
    def parse(cls, payload: bytes, *, source: str, limits: Limits = Limits()) -> "CaptureRequest":
        doc = load_record(payload, what="capture request", source=source, limits=limits)
        return checked(cls._from_dict, doc, what="capture request", source=source, id_key="request_id",
                       hint="send capture requests with `edgepack fleet capture pull`")

    @classmethod
    def _from_dict(cls, d) -> "CaptureRequest":
        rid = record_id(d, schema=SCHEMA, what="capture request", id_key="request_id")
        target = d.get("target")
        if not isinstance(target, str) or not TARGET.match(target) or not target.startswith("devices/") \
                or "/models/" in target:
            raise ValueError("target must be 'devices/ID'")
        model = d.get("model")
        if model is not None and (not isinstance(model, str) or not MODEL_NAME.match(model)):
            raise ValueError(f"model must be a model name, not {model!r:.80}")
        clear = d.get("clear", False)
        if not isinstance(clear, bool):
            raise ValueError("clear must be true or false")
        return cls(request_id=rid, target=target, model=model, clear=clear, issued=issued(d), signature=signature(d),
                   max_samples=integer(d, "max_samples", 1, MAX_SAMPLES, default=1000))


def data_topic(root: str, device: str, request_id: str) -> str:
    """Where a pull's chunks are retained (`{topic}/chunks/{i}`, as MqttTransfer names them)."""
    return f"{root}/devices/{device}/capture/data/{request_id}"


def transfer_from(doc, *, topic: str, size: int, limits: Limits = Limits()) -> MqttTransfer:
    """The result's `transfer` section, checked against the topic this pull's chunks must be on."""
    if not isinstance(doc, dict) or doc.get("method") != "mqtt" or doc.get("topic") != topic:
        raise ValueError(f"transfer must be an mqtt transfer on {topic}")
    return fixed_chunks(doc, topic=topic, size=size, limits=limits)


__all__ = ["CaptureRequest", "FINAL", "MAX_SAMPLES", "SCHEMA", "data_topic", "transfer_from"]
