"""`edgepack fleet capture pull`: a device's captured requests as a file `edgepack build` reads."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgeproto.cli_options import broker_from_options, broker_options


@click.group()
def capture() -> None:
    """Data capture: real requests kept on devices (agent `--capture-rate`), pulled home."""


@capture.command("pull")
@click.option("--device", required=True, help="Device id.")
@click.option("--model", help="The model on the device (default: its first model).")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="samples.npz (one array per input, first axis = samples, outputs as output:NAME: use it as "
                   "--calibration or --validation), or samples.txt for a text model's texts.")
@click.option("--max-samples", type=int, default=1000, show_default=True, help="The newest this many samples.")
@click.option("--clear", is_flag=True, help="Delete the pulled samples from the device once they are sent.")
@broker_options
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds for the device to pack and send the samples once it accepted the request.")
@click.option("--sign-key", type=click.Path(exists=True, path_type=Path),
              help="Fleet private key that signs the request (devices with keys refuse unsigned requests).")
@click.option("--key-cert", type=click.Path(exists=True, path_type=Path),
              help="Certificate of --sign-key from the root key (edgepack keys certify).")
@click.option("--json", "as_json", is_flag=True)
def pull(device, model, out, max_samples, clear, timeout, sign_key, key_cert, as_json, **kw):
    """Bring up to --max-samples captured requests of a model home from a device (over the broker,
    chunked and hash-checked), e.g. for the next build's calibration data."""
    from fleet.capture import Timeouts, pull as run_pull

    res = run_pull(broker_from_options(kw), device=device, model=model, out=out, max_samples=max_samples,
                   clear=clear, sign_key=sign_key, key_cert=key_cert, timeouts=Timeouts(pull_s=timeout))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    layout = ", ".join(f"{k}: (N, {', '.join(map(str, s))}) {d}" if s else f"{k}: (N,) {d}"
                       for k, (s, d) in res.get("inputs", {}).items())
    click.echo(f"{res['samples']} samples of {res.get('model')} from {device} -> {out} ({res['size']} bytes; {layout})")
    if res.get("skipped"):
        click.echo(f"  {res['skipped']} samples of another layout left out", err=True)
    if res.get("cleared"):
        click.echo(f"  {res['cleared']} captured requests deleted from the device", err=True)


__all__ = ["capture"]
