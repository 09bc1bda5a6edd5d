"""The keys a device trusts, and the key generation it has seen.

- `trusted_keys`: fleet keys trusted directly (rotating one means editing every device's config);
- `root_keys`: offline root keys that certify fleet keys (edgebundle.trust). A record or bundle
  signed by a certified key carries the certificate. The highest certificate serial accepted so
  far is persisted in DATA/trust.json: keys certified with a lower serial are refused for updates
  from then on, so pushing once with a new generation retires (or revokes) the old fleet key.

The active bundle is checked at start-up against every key the device ever accepted (a rotation
must not take running devices down); updates need a key of the current generation."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from device_agent.ota.statefile import read_state, write_state
from edgebundle import signing
from edgebundle.errors import VerificationError
from edgebundle.trust import KeyCert, verify_cert

log = logging.getLogger("edgepack.agent.ota")
MAX_CERTS = 16


class Keyring:
    def __init__(self, *, direct: list, roots: list, state_path: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.direct, self.roots, self.path, self.clock = list(direct), list(roots), state_path, clock
        self.min_serial = 0
        self.certs: dict[str, dict] = {}
        self._load()

    @property
    def enabled(self) -> bool:
        return bool(self.direct or self.roots)

    def describe(self) -> dict:
        return {"signed_updates": self.enabled, "trusted_keys": [signing.key_id(k) for k in self.direct],
                "root_keys": [signing.key_id(k) for k in self.roots], "key_serial": self.min_serial or None}

    # ---- records ----
    def verify_record(self, data: bytes, block: dict) -> str:
        """Check a record signature block over `data`; returns the signing key id. A valid
        certificate of a newer generation raises the floor (persisted) before returning."""
        if "cert" in block:
            cert = self._current(self._cert(block["cert"]))
            kid = signing.verify_block(data, block, [cert.public()], what="record signature")
            self._accept(cert)
            return kid
        if not self.direct:
            raise VerificationError("the record is signed by a key without a certificate, and this device trusts "
                                    "only keys certified by its root key(s)")
        return signing.verify_block(data, block, self.direct, what="record signature")

    def verify_job(self, payload: bytes, block: dict | None, issued: str | None, *, what: str) -> None:
        """A job sent to this device (profile job, capture request) is as trusted as an update: with
        keys configured it must be signed and say when it was issued. VerificationError says why not."""
        if not self.enabled:
            return
        if block is None:
            raise VerificationError(f"the {what} is not signed, and this device only takes signed ones",
                                    hint="send it with --sign-key FLEET_KEY")
        if issued is None:
            raise VerificationError(f"a signed {what} must say when it was issued")
        from edgebundle.jsonsafe import loads
        from edgeproto.desired import signed_bytes

        self.verify_record(signed_bytes(loads(payload, max_depth=16)), block)

    # ---- bundles ----
    def verify_bundle(self, manifest_bytes: bytes, signature: bytes | None, *, history: bool = False) -> str:
        """Check a bundle's manifest.sig. `history`: any key this device ever accepted (the
        active bundle at start-up); otherwise only keys of the current generation (updates)."""
        keys = list(self.direct)
        if signature is not None:
            try:
                doc = json.loads(signature)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and "cert" in doc:
                cert = self._cert(doc["cert"])
                keys.append((cert if history else self._current(cert)).public())
        for kid, d in self.certs.items():
            try:
                cert = self._cert(d)
                if history or (cert.serial >= self.min_serial and not cert.expired(self._now())):
                    keys.append(cert.public())
            except VerificationError:
                continue
        return signing.verify(manifest_bytes, signature, keys)

    # ---- helpers ----
    def _cert(self, doc) -> KeyCert:
        if not self.roots:
            raise VerificationError("the signing key comes with a certificate, but this device has no root key "
                                    "([ota] root_keys) to check it")
        return verify_cert(doc, self.roots)

    def _current(self, cert: KeyCert) -> KeyCert:
        if cert.serial < self.min_serial:
            raise VerificationError(
                f"key {cert.key_id} (generation {cert.serial}) was replaced by generation {self.min_serial}: refused",
                hint="sign with the current fleet key (edgepack keys certify ... --serial N)")
        if cert.expired(self._now()):
            raise VerificationError(f"the certificate of key {cert.key_id} expired at {cert.not_after.isoformat()}",
                                    hint="certify the fleet key again with a later --not-after, or check the "
                                         "device's clock")
        return cert

    def _accept(self, cert: KeyCert) -> None:
        changed = cert.key_id not in self.certs or cert.serial > self.min_serial
        self.certs[cert.key_id] = cert.doc
        if cert.serial > self.min_serial:
            log.warning("key generation %d accepted (key %s); keys of earlier generations are no longer trusted "
                        "for updates", cert.serial, cert.key_id)
            self.min_serial = cert.serial
        while len(self.certs) > MAX_CERTS:
            self.certs.pop(next(iter(self.certs)))
        if changed:
            self._save()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def _load(self) -> None:
        doc = read_state(self.path, ("min_serial", "certs"), otherwise="starting with no certified keys")
        serial = doc["min_serial"] if doc else None
        if isinstance(serial, int) and not isinstance(serial, bool) and isinstance(doc["certs"], dict):
            self.min_serial, self.certs = serial, {str(k): v for k, v in doc["certs"].items()}

    def _save(self) -> None:  # kept in memory; written again with the next accepted certificate
        write_state(self.path, {"schema": 1, "min_serial": self.min_serial, "certs": self.certs},
                    what="the key generation", indent=2)
