"""`edgepack-agent`: run a bundle on the device, or benchmark one. Thin over the library."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgebundle.errors import BundleError, EdgepackError, InputError, RuntimeUnavailableError

EXIT_CODES = ((BundleError, 5), (InputError, 2), (RuntimeUnavailableError, 6), (EdgepackError, 1))


class AgentGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgepackError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(next(code for cls, code in EXIT_CODES if isinstance(e, cls)))


def broker_options(url_help: str):
    """--broker, its credentials and TLS files, declared once for `run` and `install`; each command
    keeps its own help for the URL."""
    options = [click.option("--broker", help=url_help), click.option("--broker-username"),
               click.option("--broker-password", envvar="EDGEPACK_AGENT_BROKER_PASSWORD")]
    options += [click.option(f"--broker-{kind}-file", type=click.Path(path_type=Path))
                for kind in ("ca", "cert", "key")]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack", message="edgepack-agent %(version)s")
def main() -> None:
    """edgepack device agent: serve a bundle locally, report over MQTT."""
    from edgeruntime.quiet import quiet_native_exit

    quiet_native_exit()  # first: LiteRT's exit-time log lines after everything else's last words


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--device-id", help="Device id (default: the host name).")
@click.option("--group", "groups", multiple=True, help="Fleet group (repeatable).")
@broker_options("mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; credentials may sit in the URL.")
@click.option("--topic-prefix", help="Topic root (default edgepack/v1).")
@click.option("--data-dir", type=click.Path(path_type=Path))
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path),
              help="Initial bundle of a model, used while the data directory holds no active one for it "
                   "(repeatable: one per model; a model's name is its bundle's name).")
@click.option("--memory-budget-mb", type=int, help="Memory all models may need together (default: no budget; "
                                                   "MemAvailable is always checked).")
@click.option("--api-host", help="Bind address of the v2 API (default 127.0.0.1).")
@click.option("--api-port", type=int, help="Port of the v2 API (default 8080).")
@click.option("--api-token", envvar="EDGEPACK_AGENT_API_TOKEN", help="Require 'Authorization: Bearer TOKEN'.")
@click.option("--telemetry-interval", type=float, help="Seconds between telemetry messages (default 30).")
@click.option("--threads", type=int, help="Override the bundle's thread count.")
@click.option("--log-format", type=click.Choice(["json", "text"]))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=str),
              help="Ed25519 public key (PEM) that signs bundles and desired records (repeatable); with any, "
                   "unsigned ones are refused.")
@click.option("--root-key", "root_keys", multiple=True, type=click.Path(path_type=str),
              help="Ed25519 root key (PEM) whose certificates make fleet keys trusted (repeatable; rotation).")
@click.option("--allow-url", "allowed_urls", multiple=True,
              help="URL prefix bundles may be downloaded from, e.g. https://models.example.com/fleet/ or "
                   "file:///srv/models/ (repeatable; none: MQTT transfers only).")
@click.option("--api-max-connections", type=int, help="Connections served at once (default 64); more get 503.")
@click.option("--api-idle-timeout", type=float, help="Seconds an idle connection stays open (default 15).")
@click.option("--api-request-timeout", type=float, help="Seconds to receive a whole request (default 60).")
@click.option("--capture-rate", type=float,
              help="Keep this share of answered requests (inputs and outputs) on disk for `edgepack fleet capture "
                   "pull` (default 0: off; at most [capture] per_minute a minute; see docs/ota.md#data-capture).")
@click.option("--capture-max-mb", type=int, help="Each model's capture ring on disk (default 64 MB; oldest go first).")
@click.option("--llm-max-queue", type=int, help="Generation requests that may wait their turn per model (default 8); "
                                                "more get 503 with Retry-After.")
def run(config_path, device_id, groups, broker, broker_username, broker_password, broker_ca_file,
        broker_cert_file, broker_key_file, topic_prefix, data_dir, bundles, memory_budget_mb, api_host, api_port, api_token,
        telemetry_interval, threads, log_format, trusted_keys, root_keys, allowed_urls, api_max_connections,
        api_idle_timeout, api_request_timeout, capture_rate, capture_max_mb, llm_max_queue):
    """Serve the active bundle on the KServe v2 API and report to the broker until SIGTERM."""
    from device_agent.config import load_config
    from device_agent.proc import limit_malloc_arenas, setup_logging
    from device_agent.service import Agent

    limit_malloc_arenas()
    cfg = load_config(path=config_path, device_id=device_id, groups=tuple(groups) or None, broker=broker,
                      broker_username=broker_username, broker_password=broker_password,
                      broker_ca_file=broker_ca_file, broker_cert_file=broker_cert_file,
                      broker_key_file=broker_key_file, topic_prefix=topic_prefix, data_dir=data_dir,
                      bundle=tuple(bundles) or None, memory_budget_mb=memory_budget_mb, api_host=api_host,
                      api_port=api_port, api_token=api_token,
                      telemetry_interval=telemetry_interval, threads=threads, log_format=log_format,
                      trusted_keys=tuple(trusted_keys) or None, root_keys=tuple(root_keys) or None,
                      allowed_urls=tuple(allowed_urls) or None, api_max_connections=api_max_connections,
                      api_idle_timeout=api_idle_timeout, api_request_timeout=api_request_timeout,
                      capture_rate=capture_rate, capture_max_mb=capture_max_mb, llm_max_queue=llm_max_queue)
    setup_logging(cfg.log_format)
    Agent(cfg).run()


@main.command()
@click.option("--root", type=click.Path(path_type=Path), default="/", show_default=True,
              help="Install under this folder instead of / (staging an image, tests).")
@click.option("--prefix", type=click.Path(path_type=Path), help="Folder (a venv) holding bin/edgepack-agent "
                                                                  "[default: this agent's].")
@click.option("--device-id")
@click.option("--group", "groups", multiple=True)
@broker_options("mqtt://HOST[:PORT] or mqtts://HOST[:PORT].")
@click.option("--bundle", type=click.Path(path_type=Path), help="Initial bundle (copied to /etc/edgepack/initial).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path))
@click.option("--root-key", "root_keys", multiple=True, type=click.Path(path_type=Path))
@click.option("--allow-url", "allowed_urls", multiple=True)
@click.option("--api-host", default="127.0.0.1", show_default=True)
@click.option("--api-port", type=int, default=8080, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing config and unit (the data directory is kept).")
@click.option("--enable", is_flag=True, help="Then systemctl daemon-reload and enable --now (real root only).")
def install(root, prefix, device_id, groups, broker, broker_username, broker_password, broker_ca_file,
            broker_cert_file, broker_key_file, bundle, trusted_keys, root_keys, allowed_urls, api_host, api_port,
            force, enable):
    """Install the agent as a hardened systemd service: config, keys, unit (docs/devices/)."""
    import sys

    from device_agent.install import InstallOptions
    from device_agent.install import install as do_install

    res = do_install(InstallOptions(
        root=root, prefix=prefix or Path(sys.prefix), device_id=device_id, groups=tuple(groups), broker=broker,
        broker_username=broker_username, broker_password=broker_password, broker_ca_file=broker_ca_file,
        broker_cert_file=broker_cert_file, broker_key_file=broker_key_file, bundle=bundle,
        trusted_keys=tuple(trusted_keys), root_keys=tuple(root_keys), allowed_urls=tuple(allowed_urls),
        api_host=api_host, api_port=api_port, force=force, enable=enable))
    for p in res.written:
        click.echo(f"wrote {p}")
    for n in res.notes:
        click.echo(n)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, help="Override the bundle's thread count.")
@click.option("--max-seconds", type=float, default=20.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(bundle, runs, warmup, threads, max_seconds, as_json):
    """Latency percentiles and throughput with the device runtime (same numbers as `edgepack bench`)."""
    from edgeruntime.bench import bench_bundle, bench_text

    stats, details = bench_bundle(bundle, warmup=warmup, runs=runs, max_seconds=max_seconds, threads=threads)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "latency": stats.to_dict(), "runtime": details}, indent=2))
    else:
        click.echo(bench_text(stats.to_dict(), details))


if __name__ == "__main__":
    main()
