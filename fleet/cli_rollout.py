"""`edgepack rollout start | status | pause | resume | abort`: staged rollouts (fleet.rollout)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeproto.cli_options import broker_from_options, broker_options
from fleet.cli_shadow import shadow_from_options, shadow_options


def _signing(f):
    f = click.option("--key-cert", type=click.Path(exists=True, path_type=Path),
                     help="Certificate of --sign-key from the root key.")(f)
    return click.option("--sign-key", type=click.Path(exists=True, path_type=Path),
                        help="Fleet private key that signs the desired records.")(f)


def _show(rec, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rec.to_dict(), indent=2))
    else:
        for line in rec.summary_lines():
            click.echo(line)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _exit(rec) -> None:
    """Exit 0 once done, 3 when paused, 1 when stopped or aborted."""
    from fleet.rollout_state import RolloutStatus

    if rec.status != RolloutStatus.DONE:
        sys.exit(3 if rec.status == RolloutStatus.PAUSED else 1)


def _signer(sign_key, key_cert):
    from fleet.records import Signer

    return Signer.load(sign_key, key_cert)


@click.group()
def rollout() -> None:
    """Staged rollouts to a group: waves, soak, gates on update failures and model KPIs."""


@rollout.command("start")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--group", required=True)
@click.option("--model", help="The model on the devices to update (default: the bundle's name).")
@click.option("--device-topic", is_flag=True,
              help="Use the devices' and group's own topics, for agents that predate several models.")
@broker_options
@_signing
@click.option("--id", "rollout_id", help="Rollout id (default: GROUP-<random>).")
@click.option("--waves", default="1,10%,50%,100%", show_default=True,
              help="Cumulative device counts or percentages of the group.")
@click.option("--soak", "soak_s", type=float, default=300.0, show_default=True, help="Seconds per wave after it updated.")
@click.option("--wave-timeout", type=float, default=900.0, show_default=True,
              help="Seconds for a wave's devices to reach a final update state.")
@click.option("--baseline-seconds", type=float, default=60.0, show_default=True,
              help="Telemetry heard before a wave (each device's own pre-update p95).")
@click.option("--max-failed", default="0", show_default=True, help="Devices per wave that may fail: N or P%.")
@click.option("--max-latency-ratio", type=float, default=1.25, show_default=True,
              help="p95 after / the device's own p95 before.")
@click.option("--max-error-rate", type=float, default=0.02, show_default=True)
@click.option("--max-nonfinite", type=int, default=0, show_default=True, help="Inferences with NaN/Inf outputs.")
@click.option("--min-requests", type=int, default=20, show_default=True,
              help="Fewer inferences in the soak: reported as too little traffic to judge.")
@click.option("--gate-field", "gate_fields", multiple=True, metavar="PATH<=N|PATH>=N",
              help="A telemetry field gate, e.g. inference.latency_ms.p99<=40 (repeatable).")
@click.option("--previous", "previous_bundle", type=click.Path(exists=True, path_type=Path),
              help="The bundle the group runs now (needed when the group has no desired record).")
@click.option("--allow-interface-change", is_flag=True)
@click.option("--probation-seconds", type=float, default=30.0, show_default=True)
@click.option("--probation-requests", type=int, default=200, show_default=True)
@shadow_options
@click.option("--lease-seconds", type=float, default=30.0, show_default=True)
@click.option("--chunk-size", type=int, default=1 << 20, show_default=True)
@click.option("--delta", is_flag=True,
              help="Content-defined chunks: publish only those the broker lacks; devices fetch only those they lack "
                   "(agents that predate delta updates refuse it).")
@click.option("--json", "as_json", is_flag=True)
def rollout_start(bundle, group, model, device_topic, sign_key, key_cert, rollout_id, waves, soak_s, wave_timeout,
                  baseline_seconds, max_failed, max_latency_ratio, max_error_rate, max_nonfinite, min_requests, gate_fields,
                  previous_bundle, allow_interface_change, probation_seconds, probation_requests, lease_seconds,
                  chunk_size, delta, as_json, **kw):
    """Roll BUNDLE out to GROUP's devices in waves, as the new version of one model (--model; the
    devices' other models are never touched); exits 1 with the reason when a gate stops it."""
    from edgeproto.desired import Probation
    from fleet import rollout as ro
    from fleet.gates import FieldGate, Gates
    from fleet.rollout_state import RolloutSettings

    gates = Gates(max_failed=max_failed, max_latency_ratio=max_latency_ratio, max_error_rate=max_error_rate,
                  max_nonfinite=max_nonfinite, min_requests=min_requests,
                  fields=tuple(FieldGate.parse(g) for g in gate_fields))
    gates.allowed_failures(1)  # validates --max-failed before anything is published
    settings = RolloutSettings(waves=waves, soak_s=soak_s, wave_timeout_s=wave_timeout, baseline_s=baseline_seconds,
                               lease_s=lease_seconds, gates=gates, allow_interface_change=allow_interface_change,
                               shadow=shadow_from_options(kw),
                               probation=Probation(seconds=probation_seconds, requests=probation_requests,
                                                   max_error_rate=max_error_rate))
    rec = ro.start(bundle, broker_from_options(kw), group=group, settings=settings, model=model,
                   device_topic=device_topic, rollout_id=rollout_id,
                   previous_bundle=previous_bundle, signer=_signer(sign_key, key_cert), chunk_size=chunk_size,
                   delta=delta, say=_say)
    _show(rec, as_json)
    _exit(rec)


@rollout.command("status")
@click.argument("rollout_id", required=False)
@broker_options
@click.option("--json", "as_json", is_flag=True)
def rollout_status(rollout_id, as_json, **kw):
    """One rollout (or all retained ones): status, waves, gate readings."""
    from fleet import rollout as ro

    recs = ro.status(broker_from_options(kw), rollout_id)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in recs], indent=2))
        return
    for r in recs:
        _show(r, False)
    if not recs:
        click.echo("(no rollouts)")


@rollout.command("resume")
@click.argument("rollout_id")
@broker_options
@_signing
@click.option("--json", "as_json", is_flag=True)
def rollout_resume(rollout_id, sign_key, key_cert, as_json, **kw):
    """Continue a paused rollout, or one whose controller died (waits for its lease to expire)."""
    from fleet import rollout as ro

    rec = ro.resume(broker_from_options(kw), rollout_id, signer=_signer(sign_key, key_cert), say=_say)
    _show(rec, as_json)
    _exit(rec)


@rollout.command("pause")
@click.argument("rollout_id")
@broker_options
def rollout_pause(rollout_id, **kw):
    """Stop before the next step; `resume` continues (from any machine)."""
    from fleet import rollout as ro

    _show(ro.request(broker_from_options(kw), rollout_id, "pause", say=_say), False)


@rollout.command("abort")
@click.argument("rollout_id")
@broker_options
@_signing
@click.option("--keep", is_flag=True, help="Leave updated devices on the new version (default: send them back).")
def rollout_abort(rollout_id, sign_key, key_cert, keep, **kw):
    """End the rollout; devices it switched go back to the previous version unless --keep."""
    from fleet import rollout as ro

    _show(ro.request(broker_from_options(kw), rollout_id, "abort", rollback=not keep,
                     signer=_signer(sign_key, key_cert), say=_say),
          False)


COMMANDS = (rollout,)
