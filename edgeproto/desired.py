"""The desired-model record (`edgepack.desired/1`) published retained by `edgepack push`:
strict parsing, and its Ed25519 signature.

Self-contained (standard library + edgebundle): the fleet side builds and signs records with it,
the agent parses and checks them. A record is a JSON object; a signed one carries

    "record_signature": {"alg": "ed25519", "key_id": "<16 hex>", "sig": "<base64>", "cert": {...}?}

over the canonical JSON (edgebundle.signing.canonical_json) of the record without that member.
`cert` is present when the signing key is a fleet key certified by a root key (edgebundle.trust).
Everything that changes what a device runs or how it judges a model is inside the signed bytes:
bundle, size, transfer, version, downgrade and interface-change permissions, probation and latency thresholds, the
target topic (`target`), `issued` and `update_id` (replay protection)."""
from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from edgebundle import signing
from edgeproto.bundleref import (SIG_FIELD, TARGET, BundleRef, CdcTransfer, Limits, MqttTransfer, RecordError,
                                 UrlTransfer, checked, integer, issued, load_record, number, parse_bundle_ref,
                                 parse_transfer, record_id, section, signature)

SCHEMA = "edgepack.desired/1"


@dataclass(frozen=True)
class Probation:
    seconds: float = 30.0  # probation ends after this long...
    requests: int = 200  # ...or after this many requests on the new model, whichever comes first
    max_error_rate: float = 0.02
    max_p95_ms: float | None = None


@dataclass(frozen=True)
class Shadow:
    """A shadow phase before the switch: the staged model runs beside the serving one on a sampled
    share of live requests (off the request path) and must agree with it."""

    seconds: float = 60.0
    rate: float = 0.1  # share of live requests also run on the candidate
    min_agreement: float = 0.95  # top-1 agreement (class scores), else share of outputs with cosine >= 0.99
    min_samples: int = 20  # fewer compared requests in the phase: rejected (not enough evidence)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "rate": self.rate, "min_agreement": self.min_agreement,
                "min_samples": self.min_samples}


@dataclass(frozen=True)
class Desired(BundleRef):
    """The model a device (or group) should run: the bundle (BundleRef) and how to judge it."""

    update_id: str
    allow_downgrade: bool = False
    allow_interface_change: bool = False  # inputs/outputs may differ from the running model's
    probation: Probation = field(default_factory=Probation)
    staging_max_p95_ms: float | None = None
    shadow: Shadow | None = None  # None: switch right after staging
    issued: str | None = None  # UTC timestamp of the push (replay protection)
    target: str | None = None  # "devices/{id}" or "groups/{name}" [+ "/models/{model}"]: the record's topic
    signature: dict | None = None  # record_signature as received (None: unsigned)
    source: str = ""  # the topic it came from (device or group)

    @classmethod
    def parse(cls, payload: bytes, *, source: str, limits: Limits = Limits(),
              topic_prefix: str | None = None) -> "Desired | None":
        """None for an empty (cleared) record; RecordError naming the field for anything else
        wrong: types, ranges, topic characters, sizes over `limits`."""
        if not payload:
            return None
        doc = load_record(payload, what="desired record", source=source, limits=limits,
                          size_hint=" ([ota] max_record_bytes)")
        return cls.from_dict(doc, source=source, limits=limits, topic_prefix=topic_prefix)

    @classmethod
    def from_dict(cls, doc, *, source: str, limits: Limits = Limits(), topic_prefix: str | None = None) -> "Desired":
        return checked(lambda d: cls._from_dict(d, limits=limits, topic_prefix=topic_prefix, source=source), doc,
                       what="desired record", source=source, id_key="update_id",
                       hint="publish records with `edgepack push` (schema: docs/schemas/desired.schema.json)")

    @classmethod
    def _from_dict(cls, d, *, source: str, limits: Limits, topic_prefix: str | None) -> "Desired":
        uid = record_id(d, schema=SCHEMA, what="desired record", id_key="update_id")
        ref = parse_bundle_ref(d, limits=limits, topic_prefix=topic_prefix)
        allow_downgrade = d.get("allow_downgrade", False)
        if not isinstance(allow_downgrade, bool):
            raise ValueError("allow_downgrade must be true or false")
        allow_interface_change = d.get("allow_interface_change", False)
        if not isinstance(allow_interface_change, bool):
            raise ValueError("allow_interface_change must be true or false")
        probation = _probation(section(d, "probation", ("seconds", "requests", "max_error_rate", "max_p95_ms")))
        st = section(d, "staging", ("max_p95_ms",))
        sh = section(d, "shadow", ("seconds", "rate", "min_agreement", "min_samples"))  # {}: every default
        when = issued(d)
        target = _target(d)
        sig = signature(d)
        return cls(**vars(ref), update_id=uid, allow_downgrade=allow_downgrade,
                   allow_interface_change=allow_interface_change, probation=probation,
                   staging_max_p95_ms=_opt_ms(st, "staging.max_p95_ms"),
                   shadow=_shadow(sh) if d.get("shadow") is not None else None,
                   issued=when, target=target,
                   signature=sig, source=source)

    def to_dict(self) -> dict:
        """The record as published (without its signature)."""
        d = {"schema": SCHEMA, "update_id": self.update_id, "name": self.name, "version": self.version,
             "sha256": self.sha256, "size": self.size, "transfer": self.transfer.to_dict(),
             "allow_downgrade": self.allow_downgrade,
             "probation": {"seconds": self.probation.seconds, "requests": self.probation.requests,
                           "max_error_rate": self.probation.max_error_rate,
                           "max_p95_ms": self.probation.max_p95_ms},
             "staging": {"max_p95_ms": self.staging_max_p95_ms}, "issued": self.issued}
        if self.allow_interface_change:  # only when set: records of older pushers stay byte-identical
            d["allow_interface_change"] = True
        if self.shadow is not None:
            d["shadow"] = self.shadow.to_dict()
        if self.target is not None:
            d["target"] = self.target
        return d


@dataclass(frozen=True)
class Removal:
    """A signed request to unload one model of a device and delete its files: a desired record
    with `"remove": true` instead of a bundle, on a model's topic."""

    update_id: str
    issued: str | None = None
    target: str | None = None
    signature: dict | None = None
    source: str = ""

    @classmethod
    def _from_dict(cls, d, *, source: str) -> "Removal":
        uid = record_id(d, schema=SCHEMA, what="desired record", id_key="update_id")
        extra = set(d) - {"schema", "update_id", "remove", "issued", "target", SIG_FIELD}
        if extra:
            raise ValueError(f"a removal names no bundle; unexpected field(s) {sorted(extra)}")
        return cls(update_id=uid, issued=issued(d), target=_target(d), signature=signature(d), source=source)

    def to_dict(self) -> dict:
        d = {"schema": SCHEMA, "update_id": self.update_id, "remove": True, "issued": self.issued}
        if self.target is not None:
            d["target"] = self.target
        return d


@dataclass(frozen=True)
class Received:
    """A record as it arrived on a desired topic, parsed once: the typed record, and the bytes its
    `record_signature` covers (signed_bytes of the same parse), for the checks a device makes."""

    record: "Desired | Removal"
    signed: bytes


def receive_record(payload: bytes, *, source: str, limits: Limits = Limits(),
                   topic_prefix: str | None = None) -> Received | None:
    """parse_record, with the signed bytes from the same parse; None for a cleared topic."""
    if not payload:
        return None
    doc = _load(payload, source=source, limits=limits)
    return Received(record=_record(doc, source=source, limits=limits, topic_prefix=topic_prefix),
                    signed=signed_bytes(doc))


def parse_record(payload: bytes, *, source: str, limits: Limits = Limits(),
                 topic_prefix: str | None = None) -> "Desired | Removal | None":
    """What a desired topic holds: a bundle to run (Desired), a removal, or nothing (cleared)."""
    if not payload:
        return None
    return _record(_load(payload, source=source, limits=limits), source=source, limits=limits,
                   topic_prefix=topic_prefix)


def _load(payload: bytes, *, source: str, limits: Limits):
    return load_record(payload, what="desired record", source=source, limits=limits,
                       size_hint=" ([ota] max_record_bytes)")


def _record(doc, *, source: str, limits: Limits, topic_prefix: str | None) -> "Desired | Removal":
    if isinstance(doc, dict) and doc.get("remove") is not None:
        if doc.get("remove") is not True:
            raise RecordError(f"malformed desired record on {source}: remove must be true when present")
        return checked(lambda x: Removal._from_dict(x, source=source), doc, what="desired record", source=source,
                       id_key="update_id", hint="remove models with `edgepack push --remove --model NAME`")
    return Desired.from_dict(doc, source=source, limits=limits, topic_prefix=topic_prefix)


def _target(d: dict) -> str | None:
    target = d.get("target")
    if target is not None and (not isinstance(target, str) or not TARGET.match(target)):
        raise ValueError("target must be 'devices/ID' or 'groups/NAME', optionally + '/models/MODEL'")
    return target


def signed_bytes(doc: dict) -> bytes:
    """What a record signature covers: the canonical JSON of the record without its signature."""
    return signing.canonical_json({k: v for k, v in doc.items() if k != SIG_FIELD})


def sign_record(doc: dict, private_key, *, cert: dict | None = None) -> dict:
    """A copy of `doc` with `record_signature` (and the fleet key's certificate, when given)."""
    out = {k: v for k, v in doc.items() if k != SIG_FIELD}
    block = signing.signature_block(signed_bytes(out), private_key)
    if cert is not None:
        block["cert"] = cert
    out[SIG_FIELD] = block
    return out


def resolve(device: "Desired | None", groups: list["Desired | None"]) -> "Desired | None":
    """Device beats group; among groups, the first in the agent's configured order wins."""
    if device is not None:
        return device
    return next((g for g in groups if g is not None), None)


def url_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    """`url` is under one of the `allowed` prefixes: same scheme, host and port, and a path under
    the prefix's path (for file://, after resolving '..' and symbolic links)."""
    import os

    u = urlparse(url)
    for prefix in allowed:
        a = urlparse(prefix)
        if u.scheme != a.scheme or u.scheme not in ("http", "https", "file"):
            continue
        if u.scheme == "file":
            if u.netloc not in ("", "localhost") or u.query or u.fragment:
                continue
            from urllib.request import url2pathname

            base = os.path.realpath(url2pathname(a.path))
            path = os.path.realpath(url2pathname(u.path))
            if path == base or path.startswith(base.rstrip("/") + "/"):
                return True
            continue
        if (u.hostname or "").lower() != (a.hostname or "").lower() or _port(u) != _port(a) or u.username:
            continue
        path = posixpath.normpath("/" + unquote(u.path).lstrip("/"))
        base = posixpath.normpath("/" + unquote(a.path).lstrip("/"))
        if path == base or path.startswith(base.rstrip("/") + "/"):
            return True
    return False


def _port(u) -> int | None:
    try:
        return u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return -1


def _probation(p: dict) -> Probation:
    return Probation(seconds=number(p, "probation.seconds", "seconds", 0.0, 86400.0, Probation.seconds),
                     requests=integer(p, "requests", 1, 10 ** 9, default=Probation.requests,
                                      what="probation.requests"),
                     max_error_rate=number(p, "probation.max_error_rate", "max_error_rate", 0.0, 1.0,
                                           Probation.max_error_rate),
                     max_p95_ms=_opt_ms(p, "probation.max_p95_ms"))


def _shadow(p: dict) -> Shadow:
    return Shadow(seconds=number(p, "shadow.seconds", "seconds", 1.0, 86400.0, Shadow.seconds),
                  rate=number(p, "shadow.rate", "rate", 0.001, 1.0, Shadow.rate),
                  min_agreement=number(p, "shadow.min_agreement", "min_agreement", 0.0, 1.0, Shadow.min_agreement),
                  min_samples=integer(p, "min_samples", 1, 10 ** 6, default=Shadow.min_samples,
                                      what="shadow.min_samples"))


def _opt_ms(d: dict, what: str) -> float | None:
    v = d.get("max_p95_ms")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 3.6e6:
        raise ValueError(f"{what} must be null or a number of milliseconds > 0, not {v!r:.80}")
    return float(v)


__all__ = ["SCHEMA", "SIG_FIELD", "BundleRef", "CdcTransfer", "Desired", "Limits", "MqttTransfer", "Probation",
           "RecordError", "Received", "Removal", "Shadow", "parse_record", "receive_record",
           "UrlTransfer", "parse_transfer", "resolve", "sign_record", "signed_bytes", "url_allowed"]
