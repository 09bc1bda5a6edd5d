"""Agent configuration: defaults < TOML file < EDGEPACK_AGENT_* environment < command-line flags."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig  # noqa: F401  (re-exported: the agent's config names it)

ENV_PREFIX = "EDGEPACK_AGENT_"


@dataclass(frozen=True)
class ModelConfig:
    """One model the agent serves (`--bundle`, repeatable, or a `[[models]]` table): its initial
    bundle (used while the device holds no active one for that model) and its runtime threads."""

    bundle: Path
    threads: int | None = None


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data_dir: Path
    groups: tuple[str, ...] = ()
    broker: BrokerConfig | None = None
    bundle: Path | None = None
    telemetry_interval: float = 30.0
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: str | None = None
    max_body_bytes: int = 16 << 20
    threads: int | None = None
    buffer_max_messages: int = 10_000
    buffer_max_bytes: int = 10 << 20
    log_format: str = "json"
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public keys (PEM); when set, unsigned bundles are refused
    root_keys: tuple[str, ...] = ()  # Ed25519 root keys that certify fleet keys (rotation, docs/security.md)
    allowed_urls: tuple[str, ...] = ()  # URL prefixes bundles may be downloaded from besides the broker
    api_max_connections: int = 64
    api_idle_timeout: float = 15.0  # seconds a connection may sit idle (and between bytes of a request)
    api_request_timeout: float = 60.0  # seconds to receive a whole request (slowloris)
    max_attempts: int = 5
    max_bundle_bytes: int = 1 << 30
    max_chunks: int = 16384
    max_record_bytes: int = 1 << 20
    min_transfer_rate: int = 16 << 10
    transfer_grace_s: float = 120.0
    fault_delay: str = ""  # "staging=30,probation=5": pause before states (crash rehearsals, tests)
    profile_diagnostic_delay: str = ""  # "int8=20": ms added per timed profile inference (diagnostics, tests)
    models: tuple[ModelConfig, ...] = ()  # every configured model; `bundle` is the first one's
    memory_budget_mb: int = 0  # what all models may need together (0: no budget, MemAvailable only)
    memory_reserve_mb: int = 64  # MemAvailable kept free when a model is admitted
    capture_rate: float = 0.0  # share of answered requests kept on disk for `fleet capture pull` (0: off)
    capture_per_minute: int = 60  # captured requests a minute, at most
    capture_max_mb: int = 64  # each model's capture ring on disk
    llm_max_queue: int = 8  # generation requests that may wait for their turn per model; more get 503
    llm_concurrency: int = 1  # generations running at once per model
    llm_token_delay_ms: float = 0.0  # a pause after each generated token (diagnostics and tests)


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# flat key -> (TOML section, key in section)
_TOML = {"device_id": (None, "device_id"), "groups": (None, "groups"), "data_dir": (None, "data_dir"),
         "bundle": (None, "bundle"), "telemetry_interval": (None, "telemetry_interval"),
         "threads": (None, "threads"), "log_format": (None, "log_format"),
         "api_host": ("api", "host"), "api_port": ("api", "port"), "api_token": ("api", "token"),
         "max_body_bytes": ("api", "max_body_bytes"),
         "broker": ("broker", "url"), "broker_username": ("broker", "username"),
         "broker_password": ("broker", "password"), "broker_ca_file": ("broker", "ca_file"),
         "broker_cert_file": ("broker", "cert_file"), "broker_key_file": ("broker", "key_file"),
         "topic_prefix": ("broker", "topic_prefix"),
         "buffer_max_messages": ("buffer", "max_messages"), "buffer_max_bytes": ("buffer", "max_bytes"),
         "trusted_keys": ("ota", "trusted_keys"), "root_keys": ("ota", "root_keys"),
         "allowed_urls": ("ota", "allowed_urls"),
         "api_max_connections": ("api", "max_connections"), "api_idle_timeout": ("api", "idle_timeout_s"),
         "api_request_timeout": ("api", "request_timeout_s"),
         "max_attempts": ("ota", "max_attempts"), "max_bundle_bytes": ("ota", "max_bundle_bytes"),
         "max_chunks": ("ota", "max_chunks"), "max_record_bytes": ("ota", "max_record_bytes"),
         "min_transfer_rate": ("ota", "min_transfer_rate"), "transfer_grace_s": ("ota", "transfer_grace_s"),
         "fault_delay": ("ota", "fault_delay"), "profile_diagnostic_delay": ("profile", "diagnostic_delay"),
         "memory_budget_mb": (None, "memory_budget_mb"), "memory_reserve_mb": (None, "memory_reserve_mb"),
         "capture_rate": ("capture", "rate"), "capture_per_minute": ("capture", "per_minute"),
         "capture_max_mb": ("capture", "max_mb"), "llm_max_queue": ("llm", "max_queue"),
         "llm_concurrency": ("llm", "concurrency"), "llm_token_delay_ms": ("llm", "token_delay_ms")}
_INTS = {"llm_max_queue", "llm_concurrency", "capture_per_minute", "capture_max_mb", "memory_budget_mb", "memory_reserve_mb", "api_port", "max_body_bytes", "threads", "buffer_max_messages", "buffer_max_bytes", "api_max_connections",
         "max_attempts", "max_bundle_bytes", "max_chunks", "max_record_bytes", "min_transfer_rate"}
_FLOATS = {"llm_token_delay_ms", "capture_rate", "telemetry_interval", "api_idle_timeout", "api_request_timeout", "transfer_grace_s"}
_LISTS = ("groups", "trusted_keys", "root_keys", "allowed_urls")
# lower bounds: a setting below them is an error that names it
_MIN = {"llm_max_queue": 0, "llm_concurrency": 1, "llm_token_delay_ms": 0.0, "capture_rate": 0.0, "capture_per_minute": 1, "capture_max_mb": 1, "memory_budget_mb": 0, "memory_reserve_mb": 0, "api_port": 0, "max_body_bytes": 1024, "threads": 1, "buffer_max_messages": 1, "buffer_max_bytes": 1024,
        "api_max_connections": 1, "max_attempts": 1, "max_bundle_bytes": 1024, "max_chunks": 1,
        "max_record_bytes": 1024, "min_transfer_rate": 1, "telemetry_interval": 1e-3, "api_idle_timeout": 0.1,
        "api_request_timeout": 0.1, "transfer_grace_s": 0.0}


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        import tomli as tomllib
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"config {path}: {e}") from None
    flat, known = {}, {}
    for key, (section, sub) in _TOML.items():
        known.setdefault(section, set()).add(sub)
        src = doc if section is None else doc.get(section, {})
        if isinstance(src, dict) and sub in src:
            flat[key] = src[sub]
    if "models" in doc:
        flat["models"] = _models(doc.pop("models"), path)
    for section, value in doc.items():
        if isinstance(value, dict):
            unknown = set(value) - known.get(section, set())
            if section not in known or unknown:
                raise InputError(f"config {path}: unknown key(s) in [{section}]: {sorted(unknown or value)}")
        elif section not in known[None]:
            raise InputError(f"config {path}: unknown key {section!r}",
                             hint=f"top-level keys: {sorted(known[None])}; sections: [api] [broker] [buffer] [capture] [llm] [ota] [profile]")
    return flat


def _models(value, path: Path) -> list[dict]:
    """`[[models]]` tables: `bundle` (required) and `threads`."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise InputError(f"config {path}: models must be [[models]] tables with a bundle each")
    for m in value:
        unknown = set(m) - {"bundle", "threads"}
        if unknown or "bundle" not in m:
            raise InputError(f"config {path}: a [[models]] table takes bundle (required) and threads, not "
                             f"{sorted(unknown) or 'no bundle'}")
    return value


def _from_env(env: dict) -> dict:
    out = {}
    for key in _TOML:
        v = env.get(ENV_PREFIX + key.upper())
        if v is not None and v != "":
            out[key] = v.split(",") if key in _LISTS else v
    return out


def load_config(*, path: str | Path | None = None, env: dict | None = None, **flags) -> AgentConfig:
    """Merge the layers and validate. `flags` uses the flat keys of _TOML; None means unset."""
    merged: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file {str(p)!r} does not exist")
        merged.update(_read_toml(p))
    merged.update(_from_env(os.environ if env is None else env))
    # paths from the command line become text, as the file and the environment give them
    merged.update({k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in flags.items()
                   if v is not None and v != ()})
    models = merged.pop("models", None)
    unknown = set(merged) - set(_TOML)
    if unknown:
        raise InputError(f"unknown setting(s) {sorted(unknown)}")
    for k in (_INTS | _FLOATS) & set(merged):
        try:
            if isinstance(merged[k], bool):
                raise ValueError("a boolean")
            merged[k] = int(merged[k]) if k in _INTS else float(merged[k])
        except (TypeError, ValueError) as e:
            raise InputError(f"agent setting {k} must be a number ({e})") from None
        if k in _MIN and not merged[k] >= _MIN[k]:
            raise InputError(f"agent setting {k} must be at least {_MIN[k]}, not {merged[k]}"
                             + (" (telemetry interval must be > 0 seconds)" if k == "telemetry_interval" else ""))
    if merged.get("capture_rate", 0.0) > 1.0:
        raise InputError(f"capture rate must be a share of requests in 0..1, not {merged['capture_rate']}",
                         hint="e.g. 0.05 keeps one request in 20 (at most [capture] per_minute a minute)")
    device_id = str(merged.get("device_id") or socket.gethostname().split(".")[0])
    if not _ID.match(device_id):
        raise InputError(f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    groups = tuple(str(g).strip() for g in merged.get("groups", ()) if str(g).strip())
    for g in groups:
        if not _ID.match(g):
            raise InputError(f"group {g!r} must be 1-64 letters, digits, '.', '_' or '-'")
    broker = None
    if merged.get("broker"):
        broker = BrokerConfig(
            url=str(merged["broker"]), username=merged.get("broker_username"),
            password=merged.get("broker_password"), ca_file=merged.get("broker_ca_file"),
            cert_file=merged.get("broker_cert_file"), key_file=merged.get("broker_key_file"),
            topic_prefix=str(merged.get("topic_prefix", "edgepack/v1"))).validate()
    if merged.get("log_format", "json") not in ("json", "text"):
        raise InputError("log_format must be json or text")
    keys = {}
    for kind in ("trusted_keys", "root_keys"):
        keys[kind] = tuple(str(k) for k in merged.get(kind, ()) if str(k).strip())
        for k in keys[kind]:
            if not Path(k).is_file():
                raise InputError(f"{kind[:-1].replace('_', ' ')} {k!r} does not exist")
    urls = tuple(str(u).strip() for u in merged.get("allowed_urls", ()) if str(u).strip())
    for u in urls:
        _check_url_prefix(u)
    from device_agent.ota.updater import parse_fault_delays

    if merged.get("fault_delay") and not parse_fault_delays(str(merged["fault_delay"])):
        raise InputError(f"fault_delay {merged['fault_delay']!r} is not STATE=SECONDS[,STATE=SECONDS]")
    if merged.get("profile_diagnostic_delay"):
        from device_agent.profile import parse_delays

        try:
            parse_delays(str(merged["profile_diagnostic_delay"]))
        except ValueError as e:
            raise InputError(f"profile diagnostic_delay: {e}") from None
    kw = {f.name: merged[f.name] for f in fields(AgentConfig) if f.name in merged and f.name not in
          ("device_id", "groups", "broker", "data_dir", "bundle", "trusted_keys", "root_keys", "allowed_urls",
           "models")}
    data_dir = Path(merged.get("data_dir") or Path.home() / ".local/share/edgepack-agent")
    specs = _model_configs(merged.get("bundle"), models)
    return AgentConfig(device_id=device_id, groups=groups, broker=broker, data_dir=data_dir,
                       bundle=specs[0].bundle if specs else None, models=specs,
                       trusted_keys=keys["trusted_keys"], root_keys=keys["root_keys"], allowed_urls=urls, **kw)


def _model_configs(bundle, models: list[dict] | None) -> tuple[ModelConfig, ...]:
    """`--bundle` (repeatable; a flag replaces the file's list) or `bundle` / `[[models]]` in the file."""
    if bundle:
        items = [{"bundle": b} for b in (bundle if isinstance(bundle, (list, tuple)) else [bundle])]
    else:
        items = models or []
    out = []
    for m in items:
        path = Path(str(m["bundle"]))
        if not path.is_file():
            raise InputError(f"bundle {str(path)!r} (--bundle / bundle or [[models]] in the config) does not exist",
                             hint="give the path of an existing .edgepack file, or leave it out to start without "
                                  "a model and wait for an update")
        threads = m.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads of the model {path.name} must be an integer >= 1, not {threads!r}")
        out.append(ModelConfig(bundle=path, threads=threads))
    return tuple(out)


def _check_url_prefix(u: str) -> None:
    p = urlparse(u)
    ok = (p.scheme in ("http", "https") and p.hostname) or (p.scheme == "file" and p.path.startswith("/")
                                                             and p.netloc in ("", "localhost"))
    if not ok or p.query or p.fragment or p.username:
        raise InputError(f"allowed URL {u!r} must be an http(s)://HOST[/PATH] or file:///PATH prefix",
                         hint="e.g. https://models.example.com/fleet/ or file:///srv/edgepack/")


__all__ = ["AgentConfig", "BrokerConfig", "ModelConfig", "load_config"]
