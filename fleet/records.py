"""Update records made on the fleet side: the desired record for a prepared bundle, the removal
record, where a record goes, who signs it, what it asks of the devices, and publishing it retained.
`edgepack push` and the rollout controller both make their records here; the record format
itself (parsing, the signature) is edgeproto.desired.

A record addresses one model of a device or a group (`{root}/devices/{id}/models/{name}/desired`,
`{root}/groups/{g}/models/{name}/desired`; the model's name defaults to the bundle's), or, for agents
that predate several models, the device's or group's own topic; docs/mqtt-protocol.md says which
record a device acts on when both exist."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgebundle.errors import InputError
from edgeproto.bundleref import MODEL_NAME
from edgeproto.desired import (CdcTransfer, Desired, MqttTransfer, Probation, Removal, Shadow, UrlTransfer,
                               sign_record)
from edgeproto.mqtt import MqttClient, dumps
from edgeproto.topics import target
from fleet.errors import FleetError

TARGET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a device id or a group name


@dataclass(frozen=True)
class Address:
    """Where a desired record goes: a device or a group, and one of its models (None: the
    device's or group's own topic, the one agents that predate several models read)."""

    device: str | None = None
    group: str | None = None
    model: str | None = None

    @classmethod
    def of(cls, *, device: str | None, group: str | None, model: str | None = None) -> "Address":
        if (device is None) == (group is None):
            raise InputError("give exactly one of --device or --group")
        name = device if device is not None else group
        if not TARGET_ID.match(name or ""):
            raise InputError(f"{'device id' if device is not None else 'group'} {name!r} must be 1-64 letters, "
                             "digits, '.', '_' or '-'")
        if model is not None and not MODEL_NAME.match(model):
            raise InputError(f"model name {model!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return cls(device=device, group=group, model=model)

    @property
    def target(self) -> str:
        """The record's `target` ('devices/ID' or 'groups/NAME', + '/models/MODEL')."""
        return target("devices", self.device, self.model) if self.device else target("groups", self.group, self.model)


def default_model(manifest) -> str:
    """The model a bundle updates unless told (--model): the one of its name; a LoRA adapter bundle's, the
    model running its base (it is loaded beside it, sharing its weights)."""
    return manifest.adapter["base_name"] if manifest.adapter else manifest.name


def model_for(bundle_name: str, *, model: str | None = None, device_topic: bool = False) -> str | None:
    """The model a record addresses: `model`, else the bundle's name; None with `device_topic`."""
    if device_topic:
        if model is not None:
            raise InputError("--model and --device-topic exclude each other",
                             hint="--device-topic addresses an agent's only model, whatever its name")
        return None
    name = model or bundle_name
    if not MODEL_NAME.match(name or ""):
        raise InputError(f"the bundle's name {name!r} cannot name a model on a device (1-64 letters, digits, "
                         "'.', '_' or '-')", hint="give --model NAME (or --device-topic for agents that predate "
                                                  "several models)")
    return name


@dataclass(frozen=True)
class Prepared:
    """A bundle ready to publish: what the desired record says about it (fleet.transfer makes one
    per transfer mode)."""

    path: Path
    name: str
    version: str
    sha256: str
    size: int
    transfer: MqttTransfer | CdcTransfer | UrlTransfer
    interface: str  # edgebundle.interface.interface_hash of its manifest
    bundle_signature: dict | None


@dataclass(frozen=True)
class Signer:
    """The fleet key that signs records (None: unsigned), and its certificate from the root key."""

    key: object = None
    cert: dict | None = None

    @classmethod
    def load(cls, sign_key=None, key_cert=None) -> "Signer":
        """From a private key or its PEM path, and a certificate or its JSON path."""
        from edgebundle.signing import load_private_key

        key = load_private_key(sign_key) if isinstance(sign_key, (str, os.PathLike)) else sign_key
        cert = key_cert
        if isinstance(key_cert, (str, os.PathLike)):
            try:
                cert = json.loads(Path(key_cert).read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read key certificate {key_cert}: {e}") from None
        if cert is not None and key is None:
            raise InputError("--key-cert goes with --sign-key")
        if cert is not None:
            from edgebundle.signing import key_id

            if cert.get("key_id") != key_id(key.public_key()):
                raise InputError(f"the certificate is for key {cert.get('key_id')}, not the signing key "
                                 f"{key_id(key.public_key())}")
        return cls(key=key, cert=cert)

    def sign(self, doc: dict) -> dict:
        """`doc` signed when there is a key, else as it is."""
        return sign_record(doc, self.key, cert=self.cert) if self.key is not None else doc


@dataclass(frozen=True)
class Terms:
    """What a desired record asks of the devices besides the bundle: whether they may move to a
    lower version or to other inputs/outputs, and how they judge the new model (staging latency,
    probation, a shadow phase before the switch)."""

    allow_downgrade: bool = False
    allow_interface_change: bool = False
    probation: Probation = Probation()
    staging_max_p95_ms: float | None = None
    shadow: Shadow | None = None


def make_record(p: Prepared, *, target: str, update_id: str, issued: str | None, signer: Signer = Signer(),
                terms: Terms = Terms()) -> dict:
    """The desired record for `target` ('devices/ID' or 'groups/NAME', + '/models/MODEL'), signed when
    `signer` has a key."""
    desired = Desired(update_id=update_id, name=p.name, version=p.version, sha256=p.sha256, size=p.size,
                      transfer=p.transfer, allow_downgrade=terms.allow_downgrade,
                      allow_interface_change=terms.allow_interface_change, probation=terms.probation,
                      staging_max_p95_ms=terms.staging_max_p95_ms, shadow=terms.shadow, issued=issued, target=target)
    doc = desired.to_dict()
    doc["signature"] = p.bundle_signature  # informative: the bundle's own
    return signer.sign(doc)


def removal_record(*, target: str, update_id: str, issued: str, signer: Signer = Signer()) -> dict:
    """A removal for `target` (a model of a device or a group), signed when `signer` has a key."""
    return signer.sign(Removal(update_id=update_id, issued=issued, target=target).to_dict())


def publish_record(client: MqttClient, topic: str, doc: dict | None) -> None:
    """Retained, acknowledged; None clears the topic."""
    if not client.publish_wait(topic, dumps(doc) if doc is not None else b"", qos=1, retain=True, timeout=30):
        raise FleetError(f"the broker did not acknowledge the desired record on {topic}")


def interface_warnings(table, p: Prepared, *, devices: list[str] | None = None, group: str | None = None,
                       allowed: bool = False, model: str | None = None) -> list[str]:
    """Devices (from a FleetTable of retained status) whose `model` (None: their first) runs a
    bundle with another interface: they refuse the record unless it allows the change."""
    entries = [e for e in table.entries(group=group) if devices is None or e.status.device_id in devices]
    running = [(e.status.device_id, e.status.for_model(model).model) for e in entries]
    differ = sorted(dev for dev, m in running if m and m.interface and m.interface != p.interface)
    if not differ:
        return []
    names = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    if allowed:
        return [f"{len(differ)} device(s) run a model with another interface (inputs/outputs) than "
                f"{p.name} {p.version}: {names}; --allow-interface-change applies it: their clients must be ready"]
    return [f"{len(differ)} device(s) run a model with another interface (inputs/outputs) than {p.name} "
            f"{p.version}: {names}; they will refuse the update (push with --allow-interface-change once "
            "their clients are ready)"]


def old_agents(table, *, devices: list[str] | None = None, group: str | None = None) -> list[str]:
    """Target devices whose retained status has no `models`: agents that predate several models,
    which read only their device's and groups' own desired topics (not a model's record)."""
    entries = [e for e in table.entries(group=group) if devices is None or e.status.device_id in devices]
    return sorted(e.status.device_id for e in entries if e.status_raw is not None and "models" not in e.status_raw)


__all__ = ["Address", "Prepared", "Signer", "Terms", "TARGET_ID", "interface_warnings", "make_record", "model_for",
           "old_agents", "publish_record", "removal_record"]
