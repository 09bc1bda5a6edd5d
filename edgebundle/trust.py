"""Fleet key certificates: a root key (kept offline) certifies the fleet keys that sign bundles
and desired records, so a fleet key can be replaced without touching any device.

A certificate is a small JSON document (`NAME.cert`):

    {"schema": "edgepack.keycert/1", "key_id": "<16 hex>", "public_key": "<base64 raw Ed25519>",
     "serial": 2, "not_after": "2027-11-23T00:00:00+00:00" | null,
     "signature": {"alg": "ed25519", "key_id": "<root key id>", "sig": "<base64>"}}

The root signs the canonical JSON of the certificate without its `signature`. `serial` is the key
generation: a device that has accepted a record signed under serial N refuses keys certified
with a lower serial from then on (rotation, and revocation of a stolen key). Rotation procedure:
docs/security.md."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone

from edgebundle import signing
from edgebundle.errors import InputError, VerificationError

CERT_SCHEMA = "edgepack.keycert/1"
MAX_SERIAL = 2 ** 53  # JSON-safe integers only


@dataclass(frozen=True)
class KeyCert:
    """A fleet key certified by a root key (checked: the root signature and the fields)."""

    key_id: str
    public_key: bytes
    serial: int
    not_after: datetime | None
    root_key_id: str
    doc: dict

    def public(self):
        return signing.public_key_from_raw(self.public_key)

    def expired(self, now: datetime) -> bool:
        return self.not_after is not None and now > self.not_after


def parse_time(text, *, what: str) -> datetime:
    """An ISO 8601 timestamp with a UTC offset (a trailing Z is accepted) -> aware datetime."""
    if not isinstance(text, str) or not 10 <= len(text) <= 40:
        raise ValueError(f"{what} must be an ISO 8601 timestamp string")
    t = text[:-1] + "+00:00" if text.endswith("Z") else text
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        raise ValueError(f"{what} {text!r} has no UTC offset")
    return dt.astimezone(timezone.utc)


def certify(fleet_public_key, root_private_key, *, serial: int, not_after: datetime | None = None) -> dict:
    """A certificate for `fleet_public_key`, signed by `root_private_key`."""
    if isinstance(serial, bool) or not isinstance(serial, int) or not 1 <= serial <= MAX_SERIAL:
        raise InputError(f"serial must be an integer from 1 to {MAX_SERIAL}")
    if not_after is not None and not_after.tzinfo is None:
        raise InputError("not_after needs a time zone (use UTC)")
    doc = {"schema": CERT_SCHEMA, "key_id": signing.key_id(fleet_public_key),
           "public_key": base64.b64encode(signing.raw_public_key(fleet_public_key)).decode(),
           "serial": serial,
           "not_after": not_after.astimezone(timezone.utc).isoformat(timespec="seconds") if not_after else None}
    doc["signature"] = signing.signature_block(signing.canonical_json(doc), root_private_key)
    return doc


def verify_cert(doc, roots: list) -> KeyCert:
    """Check a certificate's form and its root signature (not the serial floor or expiry: the
    caller knows the time and the floor). VerificationError says what is wrong."""
    try:
        if not isinstance(doc, dict) or doc.get("schema") != CERT_SCHEMA:
            raise ValueError(f"schema must be {CERT_SCHEMA!r}")
        unknown = set(doc) - {"schema", "key_id", "public_key", "serial", "not_after", "signature"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}")
        serial = doc.get("serial")
        if isinstance(serial, bool) or not isinstance(serial, int) or not 1 <= serial <= MAX_SERIAL:
            raise ValueError("serial must be a positive integer")
        if not isinstance(doc.get("public_key"), str) or len(doc["public_key"]) > 100:
            raise ValueError("public_key must be base64 text")
        raw = base64.b64decode(doc["public_key"], validate=True)
        if len(raw) != 32:
            raise ValueError("public_key must be 32 raw Ed25519 bytes")
        not_after = None if doc.get("not_after") is None else parse_time(doc["not_after"], what="not_after")
    except (ValueError, TypeError) as e:
        raise VerificationError(f"key certificate is malformed: {e}", problems=["cert: malformed"]) from None
    pub = signing.public_key_from_raw(raw)
    kid = signing.key_id(pub)
    if doc.get("key_id") != kid:
        raise VerificationError(f"key certificate names key {doc.get('key_id')!r} but holds key {kid}")
    body = {k: v for k, v in doc.items() if k != "signature"}
    root = signing.verify_block(signing.canonical_json(body), doc.get("signature"), roots, what="key certificate")
    return KeyCert(key_id=kid, public_key=raw, serial=serial, not_after=not_after, root_key_id=root, doc=doc)


__all__ = ["CERT_SCHEMA", "KeyCert", "certify", "verify_cert", "parse_time"]
