"""How to reach the broker: URL, credentials, TLS files and the topic root. Shared by the agent and
the fleet side (one definition of what a broker connection is)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgebundle.errors import InputError


@dataclass(frozen=True)
class BrokerConfig:
    url: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    topic_prefix: str = "edgepack/v1"
    keepalive: int = 30

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or (8883 if self.tls else 1883)

    def validate(self) -> "BrokerConfig":
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise InputError(f"broker URL {self.url!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        user = unquote(u.username) if u.username else self.username
        pw = unquote(u.password) if u.password else self.password
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f and not Path(f).is_file():
                raise InputError(f"broker TLS file {f!r} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise InputError("a client certificate needs both cert_file and key_file")
        return replace(self, username=user, password=pw, topic_prefix=self.topic_prefix.strip("/"))
