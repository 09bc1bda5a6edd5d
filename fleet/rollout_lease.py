"""The controller lease, retained on `{root}/rollouts/{id}/lease` as {"holder", "expires"} (wall
time): one controller drives a rollout at a time and renews its lease every third of the lease
time; one that dies leaves the lease to expire, and `rollout resume` takes it over then. Only the
lease I/O lives here; the controller decides when to take, renew and release it."""
from __future__ import annotations

from typing import Callable

from fleet.errors import RolloutError
from fleet.rollout_link import Client, Clock, Inbox, publish_retained


class Lease:
    def __init__(self, client: Client, inbox: Inbox, *, holder: str, clock: Clock,
                 say: Callable[[str], None] = lambda _m: None):
        self.client, self.inbox, self.holder, self.clock, self.say = client, inbox, holder, clock, say
        self.topic = inbox.topics.rollout_lease(inbox.id)
        self.ttl = 30.0
        self._renewed = 0.0

    def held(self) -> bool:
        """Whether some controller (this one or another) holds an unexpired lease, as last heard."""
        cur = self.inbox.lease or {}
        return bool(cur.get("holder")) and self._expires(cur) > self.clock.wall()

    def acquire(self, *, ttl: float, wait_s: float) -> None:
        """Take the lease: free, expired, or ours. Waits up to `wait_s` for a dead controller's lease
        to expire. Retained messages carry no compare-and-set: after writing, the lease is read back
        once more so that two controllers starting together see one winner."""
        self.ttl = ttl
        deadline = self.clock.mono() + wait_s
        self.clock.sleep(0.3)  # the retained lease follows the SUBACK
        while True:
            cur = self.inbox.lease
            if not cur or cur.get("holder") == self.holder or self._expires(cur) < self.clock.wall():
                self._write()
                self.clock.sleep(0.5)
                if (self.inbox.lease or {}).get("holder") == self.holder:
                    self._renewed = self.clock.mono()
                    return
            other = (self.inbox.lease or {}).get("holder")
            left = max(self._expires(self.inbox.lease or {}) - self.clock.wall(), 0)
            if self.clock.mono() > deadline:
                raise RolloutError(f"rollout {self.inbox.id} is driven by {other} (lease for another {left:.0f} s)",
                                   hint="a controller that died leaves its lease to expire; run resume again then")
            self.say(f"waiting for the lease of {other} to expire ({left:.0f} s)")
            self.clock.sleep(min(max(left, 0.5), 2.0))

    def renew(self) -> None:
        """Every third of the lease time; raises when another controller has taken the lease over."""
        if self.clock.mono() - self._renewed < self.ttl / 3:
            return
        cur = self.inbox.lease or {}
        if cur.get("holder") not in (None, self.holder) and self._expires(cur) > self.clock.wall():
            raise RolloutError(f"rollout {self.inbox.id}: the lease was taken over by {cur['holder']}; "
                               "this controller stops")
        self._write()
        self._renewed = self.clock.mono()

    def release(self) -> None:
        if (self.inbox.lease or {}).get("holder") == self.holder:
            publish_retained(self.client, self.topic, None)

    def _write(self) -> None:
        publish_retained(self.client, self.topic, {"holder": self.holder, "expires": self.clock.wall() + self.ttl})

    @staticmethod
    def _expires(lease: dict) -> float:
        return float(lease.get("expires", 0))


__all__ = ["Lease"]
