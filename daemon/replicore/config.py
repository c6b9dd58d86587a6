"""The one TOML config file: where it is found, its defaults, and its validation.

Every option has a default, so no file at all is a valid config. A bad key or value raises
`ConfigError` naming the key (`section.option`) and why; `serve` and `check-config` show it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/replicore/replicore.toml")
ENV_VAR = "REPLICORE_CONFIG"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:8006"
    url_prefix: str = "/apprecovery/api/core"
    state_dir: Path = Path("./replicore-data")
    #: PEM paths; when both are empty a self-signed certificate is made in state_dir/tls.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Largest request body in bytes (JSON and binary batches alike).
    max_request_bytes: int = 40 * 1024 * 1024
    #: Bulk bodies (record batches, o3edata, upload chunks) read at once; more wait, unread.
    max_bulk_requests: int = 8
    #: Seconds a stopping server gives running requests before cutting them.
    shutdown_timeout: float = 30.0
    #: Reader connections to SQLite.
    db_readers: int = 4
    #: Where `serve` copies the database before a migration changes its schema
    #: ("" = state_dir/backups). Needs as much free space as the database takes.
    backup_dir: Path | None = None
    #: Largest size of the database file in bytes, 0 = no limit (the disk is the limit). A
    #: write past it is refused with 507, as on a full disk.
    max_database_bytes: int = 0


@dataclass(frozen=True)
class PairingConfig:
    accept_requests: bool = True
    #: Unconfirmed plus pending requests the target keeps at once.
    max_pending: int = 100
    #: Pairing requests one client address may make per hour.
    requests_per_hour: int = 20
    #: Seconds an unconfirmed request (never synced with its certificate) is kept.
    unconfirmed_ttl: float = 3600.0


@dataclass(frozen=True)
class ReplicationConfig:
    #: Seconds an open volume-image session may stay idle before it is discarded.
    session_timeout: float = 24 * 3600.0
    #: zstd level used when the target itself compresses (seed drives, direct replication).
    compression_level: int = 1


@dataclass(frozen=True)
class RecycleBinConfig:
    retention_days: float = 14.0
    #: Seconds between the daemon's housekeeping passes: purge expired bin entries, apply
    #: retention policies, then collect garbage if anything was deleted.
    sweep_interval: float = 3600.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    #: "json": one JSON object per line on stderr (for journald); "text": for a terminal.
    format: str = "json"


@dataclass(frozen=True)
class MetricsConfig:
    #: Plain-HTTP listener for Prometheus (`GET /metrics`); "" disables it. It shows tenants'
    #: usage: keep it on loopback or a management network.
    listen: str = "127.0.0.1:9106"


@dataclass(frozen=True)
class JobsConfig:
    #: Seconds a mirrored job may go without a sync from its source before it is marked failed.
    sync_timeout: float = 600.0


@dataclass(frozen=True)
class UploadsConfig:
    #: Largest file one upload session may carry, in bytes.
    max_file_bytes: int = 256 * 1024 * 1024
    #: Upload sessions one source may have open at once.
    max_open_sessions: int = 4
    #: Seconds an upload session may stay without a chunk before it is discarded.
    session_timeout: float = 3600.0


@dataclass(frozen=True)
class VerifyConfig:
    #: Hours between the daemon's verify runs (re-hash every stored record, as `replicore
    #: verify`); 0 = never.
    interval_hours: float = 0.0


_CONSOLE_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator's web console (console/), served on the API's TLS port under `path`."""

    enabled: bool = True
    path: str = "/apprecovery/admin"
    #: Seconds a console login lasts at most, and may stay unused before it ends.
    session_ttl: float = 8 * 3600.0
    idle_timeout: float = 1800.0
    cookie_name: str = "replicore_console"
    #: Dashboard warnings: a repository this full (percent of its quota); a paired source not
    #: heard from for this many days.
    quota_warning_percent: float = 90.0
    silent_source_days: float = 2.0
    #: Seconds between samples of the bytes each source stores (the billing chart).
    usage_sample_interval: float = 3600.0

    def __post_init__(self) -> None:
        if not _CONSOLE_PATH.match(self.path):
            raise ConfigError("console.path: must be like /apprecovery/admin (no trailing '/')")
        if not _COOKIE_NAME.match(self.cookie_name):
            raise ConfigError("console.cookie_name: 1-64 of letters, digits, '_', '-'")
        for name in ("session_ttl", "idle_timeout", "silent_source_days"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"console.{name}: must be more than 0")
        if self.usage_sample_interval < 1:
            raise ConfigError("console.usage_sample_interval: must be at least 1 second")
        if not 0 < self.quota_warning_percent <= 100:
            raise ConfigError("console.quota_warning_percent: must be more than 0, at most 100")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    recycle_bin: RecycleBinConfig = field(default_factory=RecycleBinConfig)
    log: LogConfig = field(default_factory=LogConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    #: The file this config was read from, or None for the embedded defaults.
    source: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.server.state_dir / "replicore.db"

    @property
    def tls_dir(self) -> Path:
        return self.server.state_dir / "tls"


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "pairing": PairingConfig,
    "replication": ReplicationConfig,
    "recycle_bin": RecycleBinConfig,
    "log": LogConfig,
    "jobs": JobsConfig,
    "uploads": UploadsConfig,
    "metrics": MetricsConfig,
    "verify": VerifyConfig,
    "console": ConsoleConfig,
}

_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("json", "text")


def locate(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config file to use: --config, then $REPLICORE_CONFIG, then /etc, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    if DEFAULT_PATH.exists():
        return DEFAULT_PATH
    return None


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, read and validate the config; defaults when there is no file."""
    path = locate(explicit)
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path | None = None) -> Config:
    where = f"{path}: " if path else ""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{where}unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{name}: must be a table [{name}]")
        sections[name] = _parse_section(name, _SECTIONS[name], value, where, path)
    config = Config(**sections, source=path)
    _check(config, where)
    return config


def _parse_section(
    name: str, cls: type, values: dict[str, Any], where: str, path: Path | None
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}{name}.{key}: unknown option (known: {', '.join(fields)})")
        kwargs[key] = _coerce(f"{where}{name}.{key}", fields[key], value, path)
    return cls(**kwargs)


def _coerce(label: str, f: dataclasses.Field[Any], value: Any, path: Path | None) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind in ("Path", "Path | None"):
        if not isinstance(value, str):
            raise ConfigError(f"{label}: must be a path string, got {type(value).__name__}")
        if value == "" and kind == "Path | None":
            return None
        resolved = Path(value)
        if not resolved.is_absolute() and path is not None:
            resolved = path.parent / resolved
        return resolved
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{label}: must not be negative, got {value}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{label}: must be a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{label}: must not be negative, got {value}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{label}: must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled option type {kind} for {label}")


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); raises ValueError with the reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not 0..65535")
    return host, int(port_text)


def _check(config: Config, where: str) -> None:
    server = config.server
    try:
        parse_listen(server.listen)
    except ValueError as error:
        raise ConfigError(f"{where}server.listen: {error}") from None
    if server.url_prefix and (
        not server.url_prefix.startswith("/") or server.url_prefix.endswith("/")
    ):
        raise ConfigError(f"{where}server.url_prefix: must start with '/' and not end with '/'")
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError(f"{where}server.tls_cert: tls_cert and tls_key go together")
    for label, tls_path in (("tls_cert", server.tls_cert), ("tls_key", server.tls_key)):
        if tls_path is not None and not tls_path.is_file():
            raise ConfigError(f"{where}server.{label}: {tls_path} does not exist")
    if server.max_request_bytes < 1024 * 1024:
        raise ConfigError(f"{where}server.max_request_bytes: must be at least 1048576")
    if server.max_bulk_requests < 1:
        raise ConfigError(f"{where}server.max_bulk_requests: must be at least 1")
    if server.db_readers < 1:
        raise ConfigError(f"{where}server.db_readers: must be at least 1")
    if config.log.level not in _LOG_LEVELS:
        raise ConfigError(f"{where}log.level: must be one of {', '.join(_LOG_LEVELS)}")
    if config.log.format not in _LOG_FORMATS:
        raise ConfigError(f"{where}log.format: must be one of {', '.join(_LOG_FORMATS)}")
    if config.metrics.listen:
        try:
            parse_listen(config.metrics.listen)
        except ValueError as error:
            raise ConfigError(f'{where}metrics.listen: {error} (or "" to disable)') from None
    if not 1 <= config.replication.compression_level <= 19:
        raise ConfigError(f"{where}replication.compression_level: must be 1..19")
    for label, seconds in (
        ("jobs.sync_timeout", config.jobs.sync_timeout),
        ("uploads.session_timeout", config.uploads.session_timeout),
    ):
        if seconds <= 0:
            raise ConfigError(f"{where}{label}: must be more than 0")
    for label, count in (
        ("uploads.max_file_bytes", config.uploads.max_file_bytes),
        ("uploads.max_open_sessions", config.uploads.max_open_sessions),
    ):
        if count < 1:
            raise ConfigError(f"{where}{label}: must be at least 1")
