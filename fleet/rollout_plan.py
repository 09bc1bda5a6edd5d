"""A new rollout's plan (fleet.rollout): the group's devices that serve the model, from their
retained status, the waves, the bundle and the version that a failed wave goes back to. The
bundles' chunks are published (retained); nothing is sent to any device and the record is not
written yet. A delta rollout (fleet.delta) cuts the bundle into content-defined chunks, says what
it costs each device and publishes only the chunks no model's index lists; the model's index names
the bundle by the rollout's record topic until the group's record takes it over (fleet.rollout)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeproto.desired import parse_transfer
from fleet import delta as cdc
from fleet.errors import RolloutError
from fleet.gates import plan_waves
from fleet.records import Prepared, interface_warnings
from fleet.rollout_link import Client, Clock, Inbox
from fleet.rollout_state import ACTIVE, RolloutRecord, RolloutSettings, RolloutStatus, Wave
from fleet.status import FleetTable
from fleet.transfer import prepare, publish_chunks, running_bundles, with_patches


def bundle_dict(p: Prepared) -> dict:
    """What the rollout record keeps of a bundle (enough to make desired records for it)."""
    return {"name": p.name, "version": p.version, "sha256": p.sha256, "size": p.size, "interface": p.interface,
            "transfer": p.transfer.to_dict(), "bundle_signature": p.bundle_signature}


def prepared(d: dict) -> Prepared:
    """A bundle_dict back as Prepared (its file is not needed: the chunks are on the broker)."""
    return Prepared(path=Path("-"), name=d["name"], version=d["version"], sha256=d["sha256"], size=d["size"],
                    transfer=parse_transfer(d["transfer"], sha256=d["sha256"], size=d["size"]),
                    interface=d.get("interface") or "", bundle_signature=d.get("bundle_signature"))


def plan(bundle: Path, *, inbox: Inbox, client: Client, clock: Clock, say: Callable[[str], None], group: str,
         settings: RolloutSettings, model: str | None, previous_bundle: Path | None, chunk_size: int,
         settle_s: float, delta: bool = False) -> RolloutRecord:
    """The record of a new rollout of `model` (None: the devices' own topics; its first wave
    pending). `inbox` must already hear the group's desired record for the model: without
    `previous_bundle` that is what a failed wave goes back to."""
    _settle(inbox.table, clock, settle_s)
    remote = inbox.record
    if remote is not None and RolloutStatus.read(remote.get("status")) in ACTIVE:
        raise RolloutError(f"rollout {inbox.id} exists and is {remote.get('status')}",
                           hint=f"edgepack rollout resume {inbox.id}, or abort it first")
    members = inbox.table.entries(group=group)
    if not members:
        raise RolloutError(f"no device of group {group!r} has reported a status",
                           hint="check the group name and that the devices are connected")
    devices = sorted(e.status.device_id for e in members if model is None or e.status.for_model(model).model)
    if len(devices) < len(members):
        say(f"{len(members) - len(devices)} device(s) of group {group} do not serve model {model}: left out")
    if not devices:
        raise RolloutError(f"no device of group {group!r} serves model {model!r}",
                           hint="push it to them first (edgepack push --model), or check --model")
    indexes = dict(inbox.indexes) if delta else None
    p = prepare(bundle, inbox.topics, chunk_size=chunk_size, indexes=indexes, model=model)
    if previous_bundle is not None:
        prev = prepare(previous_bundle, inbox.topics, chunk_size=chunk_size)
        publish_chunks(client, prev)
        previous = bundle_dict(prev)
    else:
        previous = _group_previous(p, group, _group_record(inbox, model))
    waves = plan_waves(devices, settings.waves)
    for msg in interface_warnings(inbox.table, p, devices=devices, allowed=settings.allow_interface_change,
                                  model=model):
        say(f"warning: {msg}")
    if indexes is None:
        publish_chunks(client, p)
    else:
        p = _publish_delta(client, p, indexes, inbox=inbox, devices=devices, model=model, say=say)
    now = clock.wall()
    return RolloutRecord(id=inbox.id, group=group, bundle=bundle_dict(p), previous=previous,
                         settings=settings.to_dict(), waves=[Wave(devices=w) for w in waves], created=now, updated=now,
                         model=model)


def _publish_delta(client: Client, p: Prepared, indexes: dict[str, cdc.ModelIndex], *, inbox: Inbox,
                   devices: list[str], model: str | None, say: Callable[[str], None]) -> Prepared:
    """The bundle with chunk patches against what the devices run (fleet.patches), what the update
    costs each device, said before publishing; then the chunks and patches no index lists,
    and the model's index naming the bundle by the rollout's record topic (fleet.rollout)."""
    running = running_bundles(inbox.table, device=None, group=None, model=model)
    running = {d: running.get(d) for d in devices}
    patches = {}
    if getattr(client, "cfg", None) is not None:  # the bases are read from the broker
        p, patches = with_patches(client.cfg, p, indexes, running.values())
    cost = cdc.cost(p.transfer, indexes, running=running)
    for line in cost.lines():
        say(line)
    cdc.publish_delta(client, p.path, p.transfer, skip=cdc.retained(indexes), patches=patches)
    cdc.record_index(client, inbox.topics.root, model=model or p.name, sha256=p.sha256, t=p.transfer,
                     desired_topic=inbox.topics.rollout(inbox.id), indexes=indexes)
    return p


def _group_record(inbox: Inbox, model: str | None):
    """The group's record for the model. A fleet that predates several models keeps its record on
    the group's own topic, which its devices' first model follows: a model's first rollout goes
    back to that one when it names a bundle of the model's name (no migration step)."""
    legacy = inbox.legacy_desired
    if inbox.group_desired is None and model is not None and isinstance(legacy, dict) and legacy.get("name") == model:
        return legacy
    return inbox.group_desired


def _group_previous(p: Prepared, group: str, g) -> dict:
    """The group's current desired record, as what a failed wave goes back to."""
    if isinstance(g, dict) and g.get("sha256") and g.get("sha256") != p.sha256:
        return {k: g.get(k) for k in ("name", "version", "sha256", "size", "transfer")} | {
            "interface": None, "bundle_signature": g.get("signature")}
    if isinstance(g, dict) and g.get("sha256") == p.sha256:
        raise RolloutError(f"group {group!r} already has {p.name} {p.version} as its desired model")
    raise RolloutError(f"group {group!r} has no desired record to go back to if a wave fails",
                       hint="pass --previous BUNDLE (the bundle the group runs now)")


def _settle(table: FleetTable, clock: Clock, max_s: float) -> None:
    """Until the retained status records stop arriving (quiet for 0.3 s), at most `max_s`."""
    deadline, last, seen = clock.mono() + max_s, clock.mono(), table.version
    while clock.mono() < deadline:
        clock.sleep(0.05)
        if table.version != seen:
            seen, last = table.version, clock.mono()
        elif clock.mono() - last >= 0.3:
            return


__all__ = ["plan", "bundle_dict", "prepared"]
