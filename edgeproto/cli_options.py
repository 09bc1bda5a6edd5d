"""The broker options every fleet-facing `edgepack` command takes (push, profile, fleet, rollout,
simulate, build --profile-on), declared once and turned into a BrokerConfig."""
from __future__ import annotations

import click

from edgeproto.broker import BrokerConfig

_NAMES = ("broker_url", "broker_username", "broker_password", "broker_ca_file", "broker_cert_file",
          "broker_key_file", "topic_prefix")


def broker_options(f):
    """Decorate a Click command with --broker and its credentials, CA, client certificate and topic root."""
    for opt in reversed([
        click.option("--broker", "broker_url", default="mqtt://127.0.0.1:1883", show_default=True,
                     envvar="EDGEPACK_BROKER", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
        click.option("--broker-username", envvar="EDGEPACK_BROKER_USERNAME"),
        click.option("--broker-password", envvar="EDGEPACK_BROKER_PASSWORD"),
        click.option("--broker-ca-file", type=click.Path(exists=True)),
        click.option("--broker-cert-file", type=click.Path(exists=True)),
        click.option("--broker-key-file", type=click.Path(exists=True)),
        click.option("--topic-prefix", default="edgepack/v1", show_default=True),
    ]):
        f = opt(f)
    return f


def broker_from_options(kw: dict) -> BrokerConfig:
    """Take the broker options out of a command's keyword arguments (checked)."""
    url, username, password, ca_file, cert_file, key_file, prefix = (kw.pop(n) for n in _NAMES)
    return BrokerConfig(url=url, username=username, password=password, ca_file=ca_file, cert_file=cert_file,
                        key_file=key_file, topic_prefix=prefix).validate()
