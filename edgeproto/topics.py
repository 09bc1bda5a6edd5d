"""The topic layout, defined once. Everything lives under one root (default `edgepack/v1`):

    {root}/devices/{id}/status       retained, the device's state (Last Will: offline)
    {root}/devices/{id}/telemetry    periodic inference and system windows
    {root}/devices/{id}/events       update events (one per state change)
    {root}/devices/{id}/desired      retained desired record for one device
    {root}/groups/{group}/desired    retained desired record for a group
    {root}/devices/{id}/models/{name}/desired   retained desired record for one model of a device
    {root}/groups/{group}/models/{name}/desired retained desired record for one model of a group
    {root}/devices/{id}/profile/job      profile jobs for one device (fleet -> agent, not retained)
    {root}/devices/{id}/profile/result   profile job progress and results (agent -> fleet, not retained)
    {root}/devices/{id}/capture/request  capture pulls (fleet -> agent, not retained)
    {root}/devices/{id}/capture/result   a capture pull's outcome (agent -> fleet, not retained)
    {root}/devices/{id}/capture/data/{request_id}/chunks/{i}   a pulled file's chunks (agent, retained)
    {root}/bundles/{sha256}/chunks/{i}   retained bundle chunks
    {root}/rollouts/{rollout_id}     retained rollout state (fleet side only)
    {root}/rollouts/{rollout_id}/lease   retained controller lease (fleet side only)
    {root}/rollouts/{rollout_id}/control retained pause/abort request (fleet side only)
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT = "edgepack/v1"
DEVICE_KINDS = ("status", "telemetry", "events", "desired")


@dataclass(frozen=True)
class Topics:
    """Topic names under `root`. Device arguments default to the `+` wildcard (fleet subscriptions)."""

    root: str = ROOT

    def device(self, device: str, kind: str) -> str:
        return f"{self.root}/devices/{device}/{kind}"

    def status(self, device: str = "+") -> str:
        return self.device(device, "status")

    def telemetry(self, device: str = "+") -> str:
        return self.device(device, "telemetry")

    def events(self, device: str = "+") -> str:
        return self.device(device, "events")

    def desired(self, device: str) -> str:
        return self.device(device, "desired")

    def group_desired(self, group: str) -> str:
        return f"{self.root}/groups/{group}/desired"

    def profile_job(self, device: str) -> str:
        return self.device(device, "profile/job")

    def profile_result(self, device: str = "+") -> str:
        return self.device(device, "profile/result")

    def capture_request(self, device: str) -> str:
        return self.device(device, "capture/request")

    def capture_result(self, device: str = "+") -> str:
        return self.device(device, "capture/result")

    def model_desired(self, device: str, model: str) -> str:
        return self.device(device, f"models/{model}/desired")

    def group_model_desired(self, group: str, model: str) -> str:
        return f"{self.root}/groups/{group}/models/{model}/desired"

    def target_desired(self, target: str) -> str:
        """`target` is a desired record's target: 'devices/ID' or 'groups/NAME', optionally followed
        by '/models/MODEL'."""
        return f"{self.root}/{target}/desired"

    def bundle(self, sha256: str) -> str:
        return f"{self.root}/bundles/{sha256}"

    @staticmethod
    def chunk(bundle_topic: str, index: int) -> str:
        return f"{bundle_topic.rstrip('/')}/chunks/{index}"

    def rollout(self, rollout_id: str = "+") -> str:
        return f"{self.root}/rollouts/{rollout_id}"

    def rollout_lease(self, rollout_id: str) -> str:
        return f"{self.rollout(rollout_id)}/lease"

    def rollout_control(self, rollout_id: str) -> str:
        return f"{self.rollout(rollout_id)}/control"

    def parse_device(self, topic: str) -> tuple[str, str] | None:
        """(device id, kind) for a device topic under this root, else None. Some brokers hand out
        retained messages of other topics on a wildcard subscribe: callers skip those."""
        head = f"{self.root}/devices/"
        if not topic.startswith(head):
            return None
        dev, _, kind = topic[len(head):].partition("/")
        return (dev, kind) if dev and kind in DEVICE_KINDS else None


def target(scope: str, name: str, model: str | None = None) -> str:
    """A desired record's `target`: 'devices/ID' or 'groups/NAME', '/models/MODEL' for one model."""
    return f"{scope}/{name}" + (f"/models/{model}" if model else "")


def model_of(topic: str) -> str | None:
    """The model a desired topic addresses ('.../models/{name}/desired'); None for a device's or
    group's own (old-style) desired topic."""
    head, _, tail = topic.rpartition("/models/")
    name, _, kind = tail.partition("/")
    return name if head and kind == "desired" and name else None


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker hands each message to one member of `group`."""
    return f"$share/{group}/{topic_filter}"


@dataclass(frozen=True)
class DeviceTopics:
    """One device's own topics (what the agent publishes and subscribes to)."""

    root: str
    device_id: str

    @property
    def _t(self) -> Topics:
        return Topics(self.root)

    @property
    def prefix(self) -> str:
        return self.root

    @property
    def status(self) -> str:
        return self._t.status(self.device_id)

    @property
    def telemetry(self) -> str:
        return self._t.telemetry(self.device_id)

    @property
    def events(self) -> str:
        return self._t.events(self.device_id)

    @property
    def desired(self) -> str:
        return self._t.desired(self.device_id)

    def group_desired(self, group: str) -> str:
        return self._t.group_desired(group)

    def model_desired(self, model: str = "+") -> str:
        return self._t.model_desired(self.device_id, model)

    def group_model_desired(self, group: str, model: str = "+") -> str:
        return self._t.group_model_desired(group, model)

    @property
    def profile_job(self) -> str:
        return self._t.profile_job(self.device_id)

    @property
    def profile_result(self) -> str:
        return self._t.profile_result(self.device_id)

    @property
    def capture_request(self) -> str:
        return self._t.capture_request(self.device_id)

    @property
    def capture_result(self) -> str:
        return self._t.capture_result(self.device_id)
