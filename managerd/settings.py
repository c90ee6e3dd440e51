"""Settings, built once at the edge and passed down.

Sources, weakest first: defaults (the ``DEFAULT_*`` constants below), an
optional TOML file (``--config``), ``MANAGERD_*`` environment variables, and
CLI flags. Nothing else in the daemon reads the environment.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from managerd.store.memory.deadlock import DeadlockMode
from managerd.store.memory.journal import DEFAULT_JOURNAL_COMPACT_BYTES, FsyncMode
from managerd_client.wire import DEFAULT_MAX_FRAME_BYTES

log = logging.getLogger("managerd")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50000
DEFAULT_SESSION_TTL_S = 10.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_MAX_HANDSHAKES_PER_PEER = 1000
DEFAULT_AUTH_FAILURE_LIMIT = 20
DEFAULT_AUTH_PENALTY_S = 10.0
#: Addresses never penalized for failed handshakes (fail2ban's ``ignoreip``
#: convention): one misbehaving process on a host must not lock every
#: legitimate client on that host out, and loopback is always the daemon's own.
DEFAULT_AUTH_PENALTY_EXEMPT = ("127.0.0.0/8", "::1/128")
DEFAULT_MALLOC_RETAIN_BYTES = 64 * 1024 * 1024
DEFAULT_FSYNC_INTERVAL_S = 1.0
DEFAULT_METRICS_MAX_OBJECTS = 1000
DEFAULT_AUTHKEY_FILE = Path("~/.config/managerd/authkey")


class EventLoop(enum.Enum):
    AUTO = "auto"  # uvloop if installed, else asyncio's
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


class Settings(BaseSettings):
    """Everything the daemon can be told."""

    model_config = SettingsConfigDict(env_prefix="MANAGERD_", extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    authkey: SecretStr | None = None
    authkey_file: Path | None = None
    session_ttl_s: float = Field(DEFAULT_SESSION_TTL_S, gt=0)
    handshake_timeout_s: float = Field(DEFAULT_HANDSHAKE_TIMEOUT_S, gt=0)
    shutdown_timeout_s: float = Field(DEFAULT_SHUTDOWN_TIMEOUT_S, gt=0)
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, ge=1024)
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    #: Connections one address may have open that have not authenticated yet.
    max_handshakes_per_peer: int = Field(DEFAULT_MAX_HANDSHAKES_PER_PEER, ge=1)
    #: Failed handshakes from one address within ``auth_penalty_s`` after
    #: which that address is refused for ``auth_penalty_s`` (0: never).
    auth_failure_limit: int = Field(DEFAULT_AUTH_FAILURE_LIMIT, ge=0)
    auth_penalty_s: float = Field(DEFAULT_AUTH_PENALTY_S, gt=0)
    #: Networks (CIDR; a bare address is one host) whose failed handshakes
    #: never penalize them; an empty list exempts nothing.
    auth_penalty_exempt: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_AUTH_PENALTY_EXEMPT)
    )
    allow_md5_auth: bool = True
    allowed_classes: list[str] = Field(default_factory=list)
    metrics_port: int = Field(0, ge=0, le=65535)
    #: Where the metrics endpoint listens (None: the daemon's ``host``).
    metrics_host: str | None = None
    #: A file holding a token ``/metrics`` requires as ``Authorization: Bearer``.
    metrics_token_file: Path | None = None
    metrics_max_objects: int = Field(DEFAULT_METRICS_MAX_OBJECTS, ge=1)
    data_dir: Path | None = None
    fsync: FsyncMode = FsyncMode.INTERVAL
    fsync_interval_s: float = Field(DEFAULT_FSYNC_INTERVAL_S, gt=0)
    #: Start even if a journal is corrupt in the middle, cutting it there.
    recover: bool = False
    #: A journal this large (and larger than the last snapshot) is compacted.
    journal_compact_bytes: int = Field(DEFAULT_JOURNAL_COMPACT_BYTES, ge=4096)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    #: Freed memory glibc may keep for reuse rather than give back (0: its defaults).
    malloc_retain_bytes: int = Field(DEFAULT_MALLOC_RETAIN_BYTES, ge=0)
    log_level: str = "INFO"
    #: What a wait that closes a cycle of lock waiters does (managerd/store/memory/deadlock.py).
    deadlock: DeadlockMode = DeadlockMode.REPORT
    event_loop: EventLoop = EventLoop.AUTO
    #: Where objects live: None is this daemon's memory (and ``data_dir``);
    #: ``etcd://HOST:PORT[,HOST:PORT...]`` makes it a gateway to an etcd cluster.
    store: str | None = None
    #: The etcd store's key prefix, so that deployments can share one cluster.
    store_prefix: str = "/m/"
    #: TLS to etcd (also ``etcds://``): the CA that signs the members' certificates
    #: (None: the system's), and this gateway's client certificate and key.
    store_tls_ca: Path | None = None
    store_tls_cert: Path | None = None
    store_tls_key: Path | None = None

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is not None and value not in ("", "memory"):
            etcd_endpoints(value)
        return value or None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()

    @field_validator("auth_penalty_exempt", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        # The environment may hold a JSON list or networks separated by
        # commas, as may a flag; "" is the empty list (exempt nothing).
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        if isinstance(value, (list, tuple)):
            return [n.strip() for v in value for n in str(v).split(",") if n.strip()]
        return value

    @field_validator("auth_penalty_exempt")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        networks = []
        for text in value:
            try:
                networks.append(str(ipaddress.ip_network(text)))
            except ValueError as exc:
                raise ValueError(f"{text!r} is not a network in CIDR notation ({exc})") from None
        return networks

    @model_validator(mode="after")
    def _store_tls_pairs(self) -> Settings:
        if (self.store_tls_cert is None) != (self.store_tls_key is None):
            raise ValueError("store_tls_cert and store_tls_key go together (a client certificate)")
        return self

    @property
    def store_tls(self) -> bool:
        """Whether the gateway speaks TLS to etcd: ``etcds://``, or any store_tls_* set."""
        if self.etcd_endpoints is None:
            return False
        return bool(
            (self.store or "").startswith("etcds://") or self.store_tls_ca or self.store_tls_cert
        )

    @property
    def etcd_endpoints(self) -> list[str] | None:
        """The etcd members of ``store``, or None for the memory store."""
        return None if self.store in (None, "memory") else etcd_endpoints(self.store)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets masked."""
        data = self.model_dump(mode="json")
        if self.authkey is not None:
            data["authkey"] = "**********"
        return data


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from flags (given, not None) > environment > TOML file > defaults."""

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    return _Loaded(**{k: v for k, v in flags.items() if v is not None})


class AuthkeyError(Exception):
    """The authkey could not be read safely."""


def read_key_file(path: Path, what: str = "authkey") -> bytes:
    """The secret in ``path`` (an authkey, a token), refusing a file that others may read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise AuthkeyError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthkeyError(
            f"{what} file {path} is readable by group or others; fix it with: chmod 600 {path}"
        )
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuthkeyError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if not key:
        raise AuthkeyError(f"{what} file {path} is empty")
    return key


def generated_key_path(settings: Settings) -> Path:
    """Where ``serve`` keeps the key it generates when none is configured."""
    if settings.data_dir is not None:
        return settings.data_dir.expanduser() / "authkey"
    return DEFAULT_AUTHKEY_FILE.expanduser()


def resolve_authkey(settings: Settings, *, generate: bool = True) -> tuple[bytes, str]:
    """The authkey and where it came from (a description, never the key).

    Sources, in order: ``authkey`` (``MANAGERD_AUTHKEY``), ``authkey_file``
    (``MANAGERD_AUTHKEY_FILE``), then the generated key file
    (:func:`generated_key_path`). With none of them and ``generate`` true (as
    ``serve`` does), a random key is written there once, readable only by its
    owner, and reused on later starts. With ``generate`` false (``check``,
    which must never leave a key behind), a missing key is an
    :class:`AuthkeyError`.
    """
    if settings.authkey is not None:
        key = settings.authkey.get_secret_value().encode()
        if not key:
            raise AuthkeyError("MANAGERD_AUTHKEY is empty")
        return key, "MANAGERD_AUTHKEY"
    if settings.authkey_file is not None:
        path = settings.authkey_file.expanduser()
        return read_key_file(path), f"authkey file {path}"
    path = generated_key_path(settings)
    if path.exists():
        return read_key_file(path), f"authkey file {path}"
    if not generate:
        raise AuthkeyError(
            f"no authkey: set MANAGERD_AUTHKEY or MANAGERD_AUTHKEY_FILE "
            f"(no generated key at {path} either)"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return read_key_file(path), f"new random authkey written to {path}"


def etcd_endpoints(store: str) -> list[str]:
    """``etcd://h1:p1,h2:p2`` (or ``etcds://``, TLS) as ``["h1:p1", "h2:p2"]``; ValueError
    if it is not one."""
    scheme, sep, rest = store.partition("://")
    endpoints = [e.strip() for e in rest.split(",") if e.strip()]
    if scheme not in ("etcd", "etcds") or not sep or not endpoints:
        raise ValueError(
            f"a store is 'memory' or etcd[s]://HOST:PORT[,HOST:PORT...], not {store!r}"
        )
    for endpoint in endpoints:
        host, colon, port = endpoint.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"an etcd endpoint is HOST:PORT, not {endpoint!r}")
    return endpoints
