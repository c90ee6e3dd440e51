"""The ``managerd`` command: parse, build ``Settings``, call one function.

The only module that imports typer or configures logging. Every command
reports a failure as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import inspect
import json
import logging
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from managerd.settings import (
    AuthkeyError,
    FsyncMode,
    Settings,
    load_settings,
    resolve_authkey,
)

if TYPE_CHECKING:
    from managerd_client import Manager

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="managerd: named queues, dicts, locks and more, served to Python across hosts.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file (flags win).")
]
HostOpt = Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")]
PortOpt = Annotated[int | None, typer.Option(help="Port to listen on [50000].")]
AuthkeyFileOpt = Annotated[Path | None, typer.Option(help="File holding the authkey.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Directory for durable state.")]
MetricsPortOpt = Annotated[int | None, typer.Option(help="Prometheus port; 0 is off.")]
SessionTtlOpt = Annotated[
    float | None, typer.Option(help="Seconds without heartbeat before a session ends.")
]
LogLevelOpt = Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING...")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"managerd: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None = None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(f"invalid settings: {problems}", 2) from None
    except (OSError, ValueError) as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    metrics_port: MetricsPortOpt = None,
    session_ttl_s: SessionTtlOpt = None,
    log_level: LogLevelOpt = None,
    fsync: Annotated[
        FsyncMode | None, typer.Option(help="always, interval or never [interval].")
    ] = None,
    fsync_interval_s: Annotated[
        float | None, typer.Option(help="Longest time between fsyncs with --fsync interval.")
    ] = None,
    recover: Annotated[
        bool | None,
        typer.Option("--recover", help="Start even if a journal is corrupt, cutting it there."),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve TLS with this certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key.")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA that signs client certificates.")] = None,
    tls_require_client_cert: Annotated[
        bool | None,
        typer.Option("--tls-require-client-cert", help="Mutual TLS: refuse clients without one."),
    ] = None,
    auth_penalty_exempt: Annotated[
        list[str] | None,
        typer.Option(
            help="A network (CIDR) never penalized for failed handshakes; repeat or separate "
            "with commas; '' exempts none [127.0.0.0/8, ::1/128]."
        ),
    ] = None,
) -> None:
    """Run the daemon until SIGTERM or Ctrl-C."""
    settings = _settings(**locals())  # every parameter is a settings flag
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from managerd.server import StartupError, run_server

    try:
        run_server(settings)
    except (AuthkeyError, StartupError) as exc:
        raise _fail(str(exc), 2) from None
    except OSError as exc:
        raise _fail(exc.strerror or str(exc), 1) from None


def config(**flags: Any) -> None:
    """Print the settings `serve` would use with these flags, as JSON (secrets masked)."""
    settings = _settings(**flags)
    typer.echo(json.dumps(settings.masked(), indent=2, sort_keys=True))


# `config` takes exactly the flags `serve` takes: one list, kept in one place.
config.__signature__ = inspect.signature(serve, eval_str=True)  # type: ignore[attr-defined]
app.command()(config)


@app.command()
def check(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3.0,
) -> None:
    """Exit 0 if a daemon answers at the address, 1 otherwise (for healthchecks).

    Reads the authkey from the same sources as `serve`, but never creates one.
    """
    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        m.ping()
    typer.echo(f"ok: managerd answering at {settings.host}:{settings.port}")


@app.command()
def status(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    interval_s: Annotated[
        float, typer.Option(help="Seconds between the two samples of rates.")
    ] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    timeout_s: Annotated[float, typer.Option(help="Give up connecting after this long.")] = 3.0,
) -> None:
    """Show queues (depth, reserved, rates), locks (holders, waiters) and sessions."""
    import time

    from managerd.status import render, summarize

    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        before = m.status()
        time.sleep(max(interval_s, 0.01))
        after = m.status()
    summary = summarize(before, after, max(interval_s, 0.01))
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@contextmanager
def _client(settings: Settings, timeout_s: float) -> Iterator[Manager]:
    """A client session on the daemon ``settings`` describe, or exit 1 saying why.

    Reads the authkey from the same sources as `serve`, but never creates one.
    """
    from managerd_client import AuthenticationFailed, ManagerdError, connect

    try:
        authkey, _ = resolve_authkey(settings, generate=False)
    except AuthkeyError as exc:
        raise _fail(str(exc), 1) from None
    where = f"{settings.host}:{settings.port}"
    try:
        tls = _check_tls(settings)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(f"cannot load TLS files: {exc}", 1) from None
    try:
        m = connect(
            (settings.host, settings.port), authkey=authkey, connect_timeout_s=timeout_s, tls=tls
        )
    except AuthenticationFailed as exc:
        raise _fail(f"a daemon answers at {where} but refused us: {exc}", 1) from None
    except (ManagerdError, OSError) as exc:
        raise _fail(f"no daemon answering at {where}: {exc}", 1) from None
    try:
        yield m
    except (ManagerdError, OSError) as exc:
        raise _fail(f"the daemon at {where} stopped answering: {exc}", 1) from None
    finally:
        m.close()


def _check_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context ``check`` uses against a daemon with these settings.

    The daemon's certificate is pinned by the configured files: trusted if
    ``tls_ca`` signed it, or if it is ``tls_cert`` itself. The host name is
    not checked, since ``check`` dials the listening address, which may be
    0.0.0.0. With client certificates required, ``check`` presents the
    daemon's own certificate, so that must be acceptable to ``tls_ca``.
    """
    if settings.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cafile=settings.tls_ca or settings.tls_cert)
    if settings.tls_require_client_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


def main() -> None:
    app()
