"""`edgepack fleet simulate`: run N simulated devices until Ctrl-C (or --duration)."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import click

from edgeproto.cli_options import broker_from_options, broker_options


@click.command("simulate")
@click.option("--devices", type=int, default=100, show_default=True)
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The bundle every device starts on (any valid bundle: only its manifest is used).")
@broker_options
@click.option("--group", "groups", multiple=True, help="Group(s) of every device (default: sim).")
@click.option("--id-prefix", default="sim", show_default=True, help="Device ids are PREFIX-0000, PREFIX-0001, ...")
@click.option("--latency-ms", type=float, default=10.0, show_default=True,
              help="Base latency (each device gets 0.5x..1.5x of it).")
@click.option("--rate", type=float, default=10.0, show_default=True, help="Simulated requests per second per device.")
@click.option("--telemetry-interval", type=float, default=5.0, show_default=True)
@click.option("--fail-staging", type=float, default=0.0, help="Fraction of devices whose new bundles fail staging.")
@click.option("--slow", type=float, default=0.0, help="Fraction of devices that run slower after an update.")
@click.option("--slow-factor", type=float, default=2.0, show_default=True)
@click.option("--errors", type=float, default=0.0, help="Fraction of devices that return errors after an update.")
@click.option("--error-rate", type=float, default=0.1, show_default=True)
@click.option("--drop", type=float, default=0.0, help="Fraction of devices that drop off the network when an update starts.")
@click.option("--drop-seconds", type=float, default=30.0, show_default=True)
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Devices accept only records and bundles signed by this key (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where devices keep their data (default: a temporary directory on /dev/shm).")
@click.option("--duration", type=float, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--report-every", type=float, default=10.0, show_default=True,
              help="Seconds between summary lines (JSON on stdout).")
def simulate(devices, bundle, groups, id_prefix, latency_ms, rate, telemetry_interval, fail_staging, slow, slow_factor,
             errors, error_rate, drop, drop_seconds, trusted, seed, data_dir, duration, report_every, **kw):
    """Run N devices in this process through the agent's real update path (MQTT, records, chunked
    transfer with hash checks, the update state machine, status/events/telemetry) over a stand-in
    runtime. Prints a JSON summary line every --report-every seconds."""
    from edgepack.sim.simulator import Misbehaviour, SimSettings, Simulator

    sim = Simulator(broker_from_options(kw), bundle, SimSettings(
        devices=devices, id_prefix=id_prefix, groups=tuple(groups) or ("sim",), latency_ms=latency_ms, rate=rate,
        telemetry_s=telemetry_interval, seed=seed, data_dir=data_dir, trusted_keys=tuple(trusted)),
        Misbehaviour(fail_staging=fail_staging, slow=slow, slow_factor=slow_factor, errors=errors,
                     error_rate=error_rate, drop=drop, drop_s=drop_seconds))
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    sim.start()
    try:
        n = sim.wait_connected(timeout=120)
        click.echo(json.dumps({"event": "ready", "connected": n, "seconds": round(time.monotonic() - t0, 2)}),
                   nl=True)
        end = t0 + duration if duration else None
        while not stop.wait(report_every if end is None else max(min(report_every, end - time.monotonic()), 0)):
            click.echo(json.dumps({"event": "summary", "t": round(time.monotonic() - t0, 1), **sim.summary()}))
            if end is not None and time.monotonic() >= end:
                break
    finally:
        click.echo(json.dumps({"event": "stopped", **sim.summary()}))
        sim.stop()
