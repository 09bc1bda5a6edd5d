"""`edgepack`: one command over three peers. The packager (build, targets, inspect, verify, bench,
keys, sign) and the fleet side (push, profile, fleet, broker, rollout) each declare their commands;
this module registers them, adds what needs both (demo, fleet simulate), wires the fleet's profile
jobs into `build --profile-on`, and alone maps the exception family to exit codes."""
from __future__ import annotations

import atexit
import sys
from pathlib import Path

import click

from edgebundle.errors import (AccuracyGateError, BundleError, ConversionError, EdgepackError, InputError, Reported,
                               RuntimeUnavailableError, VerificationError)
from fleet.cli import COMMANDS as FLEET, fleet
from fleet.cli_rollout import COMMANDS as ROLLOUT
from packager.cli import COMMANDS as PACKAGER, Wiring
from packager.cli_sign import COMMANDS as SIGNING

EXIT_CODES = (  # most specific first
    (VerificationError, 5), (BundleError, 5), (AccuracyGateError, 4), (ConversionError, 3),
    (InputError, 2), (RuntimeUnavailableError, 6), (EdgepackError, 1),
)


# What the packager extra brings and the agent extra does not (setup.cfg): missing on a device
PACKAGER_ONLY = frozenset({"tensorflow", "tf2onnx", "onnx", "onnx_ir", "onnxslim", "onnx2tf", "tf_keras", "keras",
                           "torch", "transformers", "safetensors", "yaml", "sympy", "amqtt", "onnx_graphsurgeon",
                           "sng4onnx"})


def exit_code(err: EdgepackError | None) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return 1


class EdgepackGroup(click.Group):
    """Turns library errors into `error: ...` plus an exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Reported as e:  # already on screen (the build's report)
            ctx.exit(exit_code(e.cause))
        except EdgepackError as e:
            click.echo(f"error: {e}", err=True)
            for p in getattr(e, "problems", [])[:20]:
                click.echo(f"  - {p}", err=True)
            ctx.exit(exit_code(e))
        except ModuleNotFoundError as e:  # an agent-only install: the packager's frameworks are not there
            missing = (e.name or "").split(".")[0]
            if missing == "sklearn":  # the demo's digits
                click.echo("error: `edgepack demo` trains on scikit-learn's digits, and scikit-learn is not "
                           "installed here", err=True)
                click.echo("  hint: pip install 'edgepack[demo]' (make demo does)", err=True)
                ctx.exit(6)
            if missing not in PACKAGER_ONLY:
                raise  # anything else missing is a bug, not an install to fix
            click.echo(f"error: `edgepack {ctx.invoked_subcommand}` needs {missing}, which is not installed here "
                       "(an agent-only install?)", err=True)
            click.echo("  hint: on a build machine: pip install 'edgepack[packager]'; a device needs only "
                       "edgepack-agent", err=True)
            ctx.exit(6)


def profile_on_device(bundles: list[Path], target, sign_key: Path | None) -> list[dict]:
    """`build --profile-on`: each probe bundle measured by a profile job on the device (fleet.profile)."""
    from fleet.profile import Timeouts, profile

    results = profile(list(bundles), target.broker, device=target.device, bench=target.bench,
                      timeouts=Timeouts(job_s=target.timeout_s), sign_key=sign_key)
    return [r.figures for r in results]


def _quiet_native_exit() -> None:
    """edgeruntime.quiet's exit handler, imported only when LiteRT's CompiledModel ran (importing
    edgeruntime costs every command numpy's import)."""
    if "edgeruntime.litert_compiled" in sys.modules:
        from edgeruntime.quiet import silence

        silence()


@click.group(cls=EdgepackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack", message="edgepack %(version)s")
@click.pass_context
def main(ctx) -> None:
    """Package trained models into verified bundles for edge devices."""
    atexit.register(_quiet_native_exit)  # first: LiteRT's exit-time log lines after everything else's last words
    ctx.obj = Wiring(device_profiler=profile_on_device)


@click.command()
@click.option("--broker", "broker_url", help="Use this broker instead of starting the embedded one.")
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep models, bundles and logs here "
                                                                   "(default: a new temporary folder).")
def demo(broker_url, workdir):
    """The whole loop on embedded defaults: build, serve, telemetry, signed OTA update."""
    from edgepack.demo import run_demo
    from edgeproto.records import UpdateState

    s = run_demo(workdir=workdir, broker_url=broker_url, say=lambda m: click.echo(m))
    ok = s["update_state"] == UpdateState.COMMITTED and s["requests_failed"] == 0 and s["to_version"] == "1.1.0"
    click.echo("== summary")
    click.echo(f"   bundles built and signed: {s['bundles_built']}")
    click.echo(f"   update digits {s['from_version']} -> {s['to_version']}: {s['update_state']} "
               f"in {s['update_seconds']} s")
    click.echo(f"   requests: {s['requests_ok']} ok, {s['requests_failed']} failed; accuracy {s['accuracy']:.2%}")
    click.echo(f"   {'OK' if ok else 'FAILED'} in {s['seconds']} s; files in {s['workdir']}")
    if not ok:
        sys.exit(1)


def _assemble() -> None:
    from edgepack.sim.cli import simulate
    from fleet.cli_capture import capture

    for cmd in PACKAGER + SIGNING + FLEET + ROLLOUT + (demo,):
        main.add_command(cmd)
    fleet.add_command(simulate)
    fleet.add_command(capture)


_assemble()

if __name__ == "__main__":
    main()
