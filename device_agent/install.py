"""`edgepack-agent install`: put the agent in place as a systemd service.

Writes, under `root` (default /; a test or an image build passes a staging folder):

    etc/edgepack/agent.toml              the configuration (0640: it may hold the broker password)
    etc/edgepack/keys/*.pem              trusted/root keys (0644), broker CA, client cert and key (0640)
    etc/edgepack/initial/<bundle>        the initial bundle, copied into the data dir at first start
    etc/systemd/system/edgepack-agent.service   the hardened unit, ExecStart pointing at this agent
    var/lib/edgepack                     the data directory (systemd's StateDirectory owns it at run time)

Paths written into the files are the device's final paths (like DESTDIR). Into the real root it
also creates the `edgepack` system user (useradd) and hands it the group of the secret files;
it never enables the service by itself unless asked (`--enable`). Existing files are only
replaced with `--force`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.errors import EdgepackError, InputError

UNIT_NAME = "edgepack-agent.service"
SERVICE_USER = "edgepack"
UNIT_TEMPLATE = Path(__file__).with_name("data") / UNIT_NAME


class InstallError(EdgepackError):
    """The files cannot be put in place (rights, existing files, a missing tool)."""


@dataclass(frozen=True)
class InstallOptions:
    root: Path = Path("/")
    prefix: Path = Path(sys.prefix)  # where bin/edgepack-agent lives (the agent's venv)
    device_id: str | None = None
    groups: tuple[str, ...] = ()
    broker: str | None = None
    broker_username: str | None = None
    broker_password: str | None = None
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    bundle: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    root_keys: tuple[Path, ...] = ()
    allowed_urls: tuple[str, ...] = ()
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    log_format: str = "text"  # journald stamps and stores it; fields stay as key=value
    force: bool = False
    enable: bool = False


@dataclass
class InstallResult:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


CONFIG_DIR, STATE_DIR, UNIT_DIR = Path("/etc/edgepack"), Path("/var/lib/edgepack"), Path("/etc/systemd/system")


def _on_device(root: Path, path: Path) -> Path:
    """Where a device path lands under `root`."""
    return root / path.relative_to("/")


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


def render_config(sections: dict[str | None, dict]) -> str:
    lines = ["# edgepack agent configuration, written by `edgepack-agent install` (docs/devices/)"]
    for section, values in sections.items():
        values = {k: v for k, v in values.items() if v not in (None, (), [])}
        if not values:
            continue
        if section:
            lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def render_unit(agent_bin: Path, config: Path) -> str:
    out = []
    for line in UNIT_TEMPLATE.read_text().splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={agent_bin} run --config {config}"
        out.append(line)
    return "\n".join(out) + "\n"


def _check_rights(opts: InstallOptions) -> None:
    real = opts.root.resolve() == Path("/")
    if real and os.geteuid() != 0:
        raise InstallError("installing the service writes /etc and /var/lib and creates the 'edgepack' user: "
                           "run it as root (sudo edgepack-agent install ...), or pass --root DIR to stage the "
                           "files in a folder")
    for d in (opts.root, *opts.root.parents):
        if d.exists():
            if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
                raise InstallError(f"cannot write under {opts.root}: {d} is not a writable folder for this user "
                                   f"(uid {os.geteuid()}); run as root or pick another --root")
            break


def install(opts: InstallOptions) -> InstallResult:
    """Write config, keys, the initial bundle and the unit under `opts.root`. Library entry point."""
    try:
        return _install(opts)
    except PermissionError as e:
        raise InstallError(f"permission denied on {e.filename} (uid {os.geteuid()}): run as root, or pass "
                           "--root DIR to stage the files in a folder you can write") from None
    except OSError as e:
        raise InstallError(f"cannot write {e.filename or opts.root}: {e.strerror or e}") from None


def _install(opts: InstallOptions) -> InstallResult:
    _check_rights(opts)
    agent_bin = opts.prefix / "bin" / "edgepack-agent"
    if not agent_bin.is_file():
        raise InputError(f"{agent_bin} does not exist: --prefix must be the folder (a venv) holding bin/edgepack-agent")
    for label, p in [("bundle", opts.bundle), ("broker CA file", opts.broker_ca_file),
                     ("broker certificate", opts.broker_cert_file), ("broker key", opts.broker_key_file),
                     *[("trusted key", k) for k in opts.trusted_keys], *[("root key", k) for k in opts.root_keys]]:
        if p is not None and not Path(p).is_file():
            raise InputError(f"{label} {str(p)!r} does not exist")
    if (opts.broker_cert_file is None) != (opts.broker_key_file is None):
        raise InputError("a client certificate needs both --broker-cert-file and --broker-key-file")
    root = opts.root
    res = InstallResult()
    config = CONFIG_DIR / "agent.toml"
    unit = UNIT_DIR / UNIT_NAME
    planned = [config, unit] + ([CONFIG_DIR / "initial" / opts.bundle.name] if opts.bundle else [])
    existing = [p for p in planned if _on_device(root, p).exists()]
    if existing and not opts.force:
        raise InstallError(f"already installed: {', '.join(str(_on_device(root, p)) for p in existing)} exist; "
                           "pass --force to replace them (the data directory is never touched)")
    real = root.resolve() == Path("/")
    if real:
        _ensure_user(res)

    def put(src: Path | None, dest_dir: Path, mode: int) -> str | None:
        if src is None:
            return None
        dest = dest_dir / Path(src).name
        _copy(Path(src), _on_device(root, dest), mode, real, res)
        return str(dest)

    keys = CONFIG_DIR / "keys"
    sections = {
        None: {"device_id": opts.device_id, "groups": list(opts.groups), "data_dir": str(STATE_DIR),
               "bundle": put(opts.bundle, CONFIG_DIR / "initial", 0o644), "log_format": opts.log_format},
        "api": {"host": opts.api_host, "port": opts.api_port},
        "broker": {"url": opts.broker, "username": opts.broker_username, "password": opts.broker_password,
                   "ca_file": put(opts.broker_ca_file, keys, 0o644),
                   "cert_file": put(opts.broker_cert_file, keys, 0o644),
                   "key_file": put(opts.broker_key_file, keys, 0o640)},
        "ota": {"trusted_keys": [put(k, keys, 0o644) for k in opts.trusted_keys],
                "root_keys": [put(k, keys, 0o644) for k in opts.root_keys],
                "allowed_urls": list(opts.allowed_urls)},
    }
    _write(_on_device(root, config), render_config(sections).encode(), 0o640, real, res)
    _write(_on_device(root, unit), render_unit(agent_bin, config).encode(), 0o644, False, res)
    state = _on_device(root, STATE_DIR)
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    if opts.enable and real:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise InstallError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:300]}")
        res.notes.append("service enabled and started: journalctl -u edgepack-agent -f")
    else:
        res.notes.append(f"next: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}"
                         + ("" if real else f" (on the device; these files were staged under {root})"))
    return res


def _chgrp(path: Path, real: bool) -> None:
    if real:
        shutil.chown(path, group=SERVICE_USER)


def _write(path: Path, data: bytes, mode: int, secret: bool, res: InstallResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    if secret:
        _chgrp(tmp, True)
    os.replace(tmp, path)
    res.written.append(path)


def _copy(src: Path, dest: Path, mode: int, real: bool, res: InstallResult) -> None:
    _write(dest, src.read_bytes(), mode, real and mode == 0o640, res)


def _ensure_user(res: InstallResult) -> None:
    import grp
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        raise InstallError(f"no user {SERVICE_USER!r} and no useradd to create it: create a system user "
                           f"{SERVICE_USER!r} and run install again")
    extra = [g for g in ("plugdev", "video", "apex") if _group_exists(grp, g)]
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(STATE_DIR),
           "--shell", "/usr/sbin/nologin"] + (["--groups", ",".join(extra)] if extra else []) + [SERVICE_USER]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:300]}")
    res.notes.append(f"created system user {SERVICE_USER!r}" + (f" (groups {', '.join(extra)})" if extra else ""))


def _group_exists(grp, name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
