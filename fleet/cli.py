"""`edgepack push | profile | fleet | broker`: the fleet side of the CLI (assembled into the one
`edgepack` command by edgepack.cli)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeproto.cli_options import broker_from_options, broker_options
from fleet.cli_shadow import shadow_from_options, shadow_options


@click.command()
@click.argument("bundle", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--device", help="Device id.")
@click.option("--group", help="Fleet group.")
@click.option("--model", help="The model on the devices to update (default: the bundle's name) or to --remove.")
@click.option("--device-topic", is_flag=True,
              help="Publish on the device's or group's own topic, for agents that predate several models "
                   "(they serve one model, whatever its name).")
@click.option("--remove", is_flag=True,
              help="Remove --model from the devices (unload it, delete its files); no BUNDLE.")
@broker_options
@click.option("--url", help="Devices download from this http(s):// or file:// URL instead of MQTT chunks.")
@click.option("--chunk-size", type=int, default=1 << 20, show_default=True, help="Bytes per MQTT chunk.")
@click.option("--delta", is_flag=True, help="Content-defined chunks: devices fetch only the chunks their bundles lack "
                                            "(with --url: as byte ranges of the bundle there; agents that predate "
                                            "delta updates refuse such records).")
@click.option("--allow-downgrade", is_flag=True, help="Let devices move to a lower version.")
@click.option("--allow-interface-change", is_flag=True,
              help="Let devices apply a model whose inputs/outputs differ from the running one (clients must be ready).")
@click.option("--probation-seconds", type=float, default=30.0, show_default=True)
@click.option("--probation-requests", type=int, default=200, show_default=True)
@click.option("--max-error-rate", type=float, default=0.02, show_default=True)
@click.option("--latency-budget-ms", type=float, help="p95 budget for staging and probation.")
@shadow_options
@click.option("--sign-key", type=click.Path(exists=True, path_type=Path),
              help="Fleet private key that signs the desired record (devices with keys refuse unsigned records).")
@click.option("--key-cert", type=click.Path(exists=True, path_type=Path),
              help="Certificate of --sign-key from the root key (edgepack keys certify).")
@click.option("--wait", is_flag=True, help="Follow each device until it commits, fails or rolls back (or removes).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="With --wait.")
@click.option("--json", "as_json", is_flag=True)
def push(bundle, device, group, model, device_topic, remove, url, chunk_size, delta, allow_downgrade,
         allow_interface_change, probation_seconds, probation_requests, max_error_rate, latency_budget_ms, sign_key, key_cert, wait, timeout,
         as_json, **kw):
    """Make BUNDLE the desired version of a model on a device or a group (retained: offline devices
    catch up); or, with --remove, take a model off them."""
    from edgeproto.desired import Probation
    from fleet.push import Follow, PushOptions, push as push_bundle, remove as remove_model
    from fleet.records import Terms
    from fleet.transfer import TransferSpec

    def show(dev, ev):
        if as_json:
            return
        prog = ev.get("progress") or {}
        extra = f" {prog.get('percent')}%" if prog else ""
        if "fetched" in prog:  # a delta: what came over the network, what the device already had
            patched = f", {prog['patched']} rebuilt from patches" if prog.get("patched") else ""
            extra += f" (fetched {prog['fetched']} of {prog['total']} bytes, {prog.get('reused', 0)} reused{patched})"
        err = f" ({ev['error']})" if ev.get("error") else ""
        click.echo(f"  {dev}: {ev.get('state')}{extra}{err}", err=True)

    shadow = shadow_from_options(kw)
    if remove == (bundle is not None):
        raise click.UsageError("give a BUNDLE to push, or --remove --model NAME (and no bundle)")
    if remove and device_topic:
        raise click.UsageError("--remove takes a model off the devices: give --model NAME, not --device-topic")
    broker = broker_from_options(kw)
    if remove:
        res = remove_model(broker, model=model, device=device, group=group, wait=wait, timeout=timeout, progress=show,
                           sign_key=sign_key, key_cert=key_cert)
    else:
        opts = PushOptions(device=device, group=group, model=model, device_topic=device_topic,
                           transfer=TransferSpec(url=url, chunk_size=chunk_size, delta=delta),
                           terms=Terms(allow_downgrade=allow_downgrade, allow_interface_change=allow_interface_change,
                                       probation=Probation(seconds=probation_seconds, requests=probation_requests,
                                                           max_error_rate=max_error_rate,
                                                           max_p95_ms=latency_budget_ms),
                                       staging_max_p95_ms=latency_budget_ms, shadow=shadow),
                           sign_key=sign_key, key_cert=key_cert,
                           follow=Follow(timeout=timeout, progress=show) if wait else None)
        res = push_bundle(bundle, broker, opts, warn=lambda m: click.echo(f"warning: {m}", err=True),
                          inform=lambda m: click.echo(m, err=True) if not as_json else None)
    d = res.desired
    if as_json:
        click.echo(json.dumps({"topic": res.topic, "desired": d, "devices": res.devices, "warnings": res.warnings},
                              indent=2))
    else:
        head = "removal" if remove else f"desired {d['name']} {d['version']} (sha256 {d['sha256'][:16]}...)"
        click.echo(f"{head}, update {d['update_id']} -> {res.topic}")
        for dev, ev in sorted(res.devices.items()):
            click.echo(f"  {dev:<20} {ev.get('state'):<12} {ev.get('error') or ''}")
    if wait and not res.ok:
        sys.exit(1)


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device", required=True, help="Id of the running device that measures the bundles.")
@broker_options
@click.option("--threads", type=int, help="Threads the device times with (default: each bundle's own setting).")
@click.option("--runs", type=int, default=200, show_default=True, help="Timed runs per bundle (at most).")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--max-seconds", type=float, default=20.0, show_default=True, help="Timed seconds per bundle (at most).")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for each job once the device accepted it.")
@click.option("--chunk-size", type=int, default=1 << 20, show_default=True, help="Bytes per MQTT chunk.")
@click.option("--sign-key", type=click.Path(exists=True, path_type=Path),
              help="Fleet private key that signs the job (devices with keys refuse unsigned jobs).")
@click.option("--key-cert", type=click.Path(exists=True, path_type=Path),
              help="Certificate of --sign-key from the root key (edgepack keys certify).")
@click.option("--json", "as_json", is_flag=True)
def profile(bundles, device, threads, runs, warmup, max_seconds, timeout, chunk_size, sign_key, key_cert, as_json,
            **kw):
    """Measure BUNDLEs on a running device (a profile job: fetched, checked, loaded beside the serving
    model, benchmarked, discarded; never activated)."""
    from edgebundle.errors import InputError
    from edgeproto.jobs import MAX_BENCH_SECONDS, BenchSettings
    from fleet.profile import Timeouts, profile as run_profile, result_row

    if threads is not None and not 1 <= threads <= 256:
        raise InputError("--threads must be between 1 and 256")
    if runs < 5 or warmup < 0 or not 0 < max_seconds <= MAX_BENCH_SECONDS or timeout <= 0:
        raise InputError(f"--runs must be at least 5, --warmup at least 0, --max-seconds in (0, "
                         f"{MAX_BENCH_SECONDS:g}] and --timeout positive")

    def show(r):
        if not as_json and not r.final:
            click.echo(f"  {r.device_id}: {r.state}{' ' + r.phase if r.phase else ''}", err=True)

    results = run_profile(list(bundles), broker_from_options(kw), device=device, sign_key=sign_key,
                          key_cert=key_cert,
                          bench=BenchSettings(threads=threads, runs=runs, warmup=warmup, max_seconds=max_seconds),
                          timeouts=Timeouts(job_s=timeout), chunk_size=chunk_size, progress=show)
    rows = [dict(result_row(r), file=str(b)) for r, b in zip(results, bundles)]
    if as_json:
        click.echo(json.dumps({"device": device, "results": [r.to_dict() for r in results], "rows": rows}, indent=2))
        return
    head = ("bundle", "precision", "p50 ms", "p95 ms", "p99 ms", "inf/s", "load ms", "RSS +MB", "provider", "golden")
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    table = [head] + [(r["file"], r["precision"] or "-", fmt(r["p50_ms"]), fmt(r["p95_ms"]), fmt(r["p99_ms"]),
                       fmt(r["throughput_ips"], "{:.1f}"), fmt(r["load_ms"], "{:.1f}"),
                       fmt(None if r["rss_delta_bytes"] is None else r["rss_delta_bytes"] / 2 ** 20, "{:.1f}"),
                       r["provider"] or "-", {True: "ok", False: "FAILED"}.get(r["golden_ok"], "-")) for r in rows]
    w = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    click.echo(f"measured on {device}:")
    for row in table:
        click.echo("  ".join(str(c).ljust(n) for c, n in zip(row, w)).rstrip())
    if any(r["golden_ok"] is False for r in rows):
        sys.exit(1)


@click.group()
def fleet() -> None:
    """Watch the fleet."""


@fleet.command("status")
@broker_options
@click.option("--group", help="Only devices in this group.")
@click.option("--listen", type=float, default=2.0, show_default=True, help="Seconds to collect live telemetry.")
@click.option("--json", "as_json", is_flag=True)
def fleet_status(group, listen, as_json, **kw):
    """Devices, one line per model: online, model and version, update state, signed updates, p95
    latency and errors of that model, decode tokens/s of a generative model, last seen. --json: the device rows with their `models`."""
    from fleet.status import status

    rows = status(broker_from_options(kw), group=group, listen_s=listen)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    head = ("device", "online", "model", "version", "update", "signed", "p95 ms", "errors", "tok/s", "last seen")
    table = [head] + [line for r in rows for line in _status_lines(r)]
    w = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(str(c).ljust(n) for c, n in zip(row, w)).rstrip())
    if not rows:
        click.echo("(no devices have reported)")


def _status_lines(r: dict) -> list[tuple]:
    """A device's lines of `fleet status`: the device's columns on the first, one model per line."""
    dev = (r["device_id"], {True: "yes", False: "NO"}.get(r["online"], "?"))
    tail = ({True: "yes", False: "NO"}.get(r["signed_updates"], "?"),)
    models = r["models"] or [{"name": None, "version": None, "update": None, "p95_ms": r["p95_ms"],
                              "errors": r["errors"], "rejected": r.get("rejected")}]
    return [(*(dev if i == 0 else ("", "")), m["name"] or "-", m["version"] or "-", m["update"] or "-",
             *(tail if i == 0 else ("",)), "-" if m["p95_ms"] is None else f"{m['p95_ms']:.2f}",
             "-" if m["errors"] is None else str(m["errors"]) + (f" (+{m['rejected']} refused)" if m.get("rejected") else ""),
             "-" if m.get("decode_tok_s") is None else f"{m['decode_tok_s']:.1f}",
             (r["last_seen"] or "-") if i == 0 else "")
            for i, m in enumerate(models)]


@fleet.command("serve")
@broker_options
@click.option("--listen", default="127.0.0.1:8780", show_default=True,
              help="HOST:PORT of the page (port 0: a free one). Loopback by default: the page has no login, so "
                   "anyone who can reach the address sees the fleet.")
@click.option("--group", help="Only devices and rollouts of this group.")
def fleet_serve(listen, group, **kw):
    """Serve a live web page of the fleet (devices, p95, updates, rollouts) until Ctrl-C.
    Binds to 127.0.0.1 unless --listen says otherwise."""
    from fleet.web import is_loopback, parse_listen, serve

    host, port = parse_listen(listen)
    if not is_loopback(host):
        click.echo(f"warning: serving on {host}, beyond this machine; the page has no login", err=True)
    serve(broker_from_options(kw), host=host, port=port, group=group,
          ready=lambda url: click.echo(f"fleet page on {url} (Ctrl-C stops)", err=True))


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1883, show_default=True)
@click.pass_context
def broker(ctx, host, port):
    """Run the embedded MQTT broker (amqtt) for local trials, until Ctrl-C; or `broker config`."""
    if ctx.invoked_subcommand is not None:
        return
    from fleet.broker import run

    run(host, port, ready=lambda: click.echo(f"embedded MQTT broker on mqtt://{host}:{port} (Ctrl-C stops)",
                                             err=True))


def _device_account(text: str):
    from fleet.broker import DeviceAccount

    dev, _, groups = text.partition(":")
    return DeviceAccount(device_id=dev, groups=tuple(g for g in groups.split(",") if g))


@broker.command("config")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, required=True,
              help="ID or ID:GROUP,GROUP (repeatable): one MQTT account per device.")
@click.option("--fleet-user", "fleet_users", multiple=True, help="Fleet role account(s) (default: fleet).")
@click.option("--collector-user", "collector_users", multiple=True,
              help="Read-only account(s) for telemetry/status consumers (MQTT 5 shared subscriptions).")
@click.option("--listen", default="0.0.0.0:8883", show_default=True, help="HOST:PORT of the listener.")
@click.option("--cafile", type=click.Path(exists=True), help="CA certificate (TLS).")
@click.option("--certfile", type=click.Path(exists=True), help="The broker's certificate (TLS).")
@click.option("--keyfile", type=click.Path(exists=True), help="The broker's private key (TLS).")
@click.option("--require-client-cert", is_flag=True, help="Devices must also present a certificate.")
@click.option("--no-tls", is_flag=True, help="Plain TCP: loopback trials only.")
@click.option("--topic-prefix", default="edgepack/v1", show_default=True)
@click.option("--run-as", help="System user mosquitto drops to (its `user` setting).")
def broker_config(out_dir, devices, fleet_users, collector_users, listen, cafile, certfile, keyfile,
                  require_client_cert, no_tls, topic_prefix, run_as):
    """Write mosquitto.conf, an ACL, a password file and per-device credentials for a fleet."""
    from edgebundle.errors import InputError
    from fleet.broker import MosquittoSetup, TlsFiles, write_mosquitto_config

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--listen {listen!r} is not HOST:PORT")
    tls = None
    if not no_tls:
        if not (cafile and certfile and keyfile):
            raise InputError("TLS needs --cafile, --certfile and --keyfile (or --no-tls for a loopback trial)")
        tls = TlsFiles(cafile=str(Path(cafile).resolve()), certfile=str(Path(certfile).resolve()),
                       keyfile=str(Path(keyfile).resolve()))
    res = write_mosquitto_config(MosquittoSetup(
        out_dir=out_dir, devices=tuple(_device_account(d) for d in devices), fleet_users=fleet_users or ("fleet",),
        collector_users=tuple(collector_users),
        topic_prefix=topic_prefix.strip("/"), host=host, port=int(port), tls=tls,
        require_client_certificate=require_client_cert, run_as=run_as))
    click.echo(f"wrote {res['conf']}, {res['acl']}, {res['passwd']}; credentials in {res['credentials']}/ (0600)")
    click.echo(f"run: mosquitto -c {res['conf']}")


COMMANDS = (push, profile, fleet, broker)

