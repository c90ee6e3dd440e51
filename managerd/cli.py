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

# typer vendors click (0.29+); its exceptions are not re-exported.
from typer._click import Context, exceptions
from typer.core import TyperCommand

from managerd import __version__
from managerd.settings import AuthkeyError, Settings, load_settings, resolve_authkey
from managerd.store.memory.deadlock import DeadlockMode
from managerd.store.memory.journal import FsyncMode

if TYPE_CHECKING:
    from managerd_client import Manager


class _Command(TyperCommand):
    """A command whose unknown-option error lists every option it takes.

    click suggests the one closest name, so ``serve --bogus`` said only
    ``--host``; the whole list tells a new user what there is.
    """

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except exceptions.NoSuchOption as exc:
            takes = sorted({o for p in self.params for o in p.opts if o.startswith("--")})
            raise exceptions.UsageError(
                f"no such option: {exc.option_name}. `{ctx.command_path}` takes "
                + ", ".join(takes),
                ctx,
            ) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"managerd {__version__}")
        raise typer.Exit()


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no "<bool>" shown after flags
    help="managerd: named queues, dicts, locks and more, served to Python across hosts.",
)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """managerd: named queues, dicts, locks and more, served to Python across hosts."""


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
#: The client commands' --host and --port: where the daemon is, not where to listen.
DaemonHostOpt = Annotated[str | None, typer.Option(help="Address of the daemon [127.0.0.1].")]
DaemonPortOpt = Annotated[int | None, typer.Option(help="Port of the daemon [50000].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TimeoutOpt = Annotated[float, typer.Option(help="Give up connecting after this long.")]
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


@app.command(cls=_Command)
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
    deadlock: Annotated[
        DeadlockMode | None,
        typer.Option(help="A wait that closes a cycle of lock waiters: report, raise or off."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="memory (this daemon), or etcd://HOST:PORT[,HOST:PORT...]: a gateway to an "
            "etcd cluster that any number of gateways serve [memory]."
        ),
    ] = None,
    store_prefix: Annotated[
        str | None, typer.Option(help="The etcd store's key prefix [/m/].")
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
app.command(cls=_Command)(config)


@app.command(cls=_Command)
def check(
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
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


@app.command(cls=_Command)
def status(
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    interval_s: Annotated[
        float, typer.Option(help="Seconds between the two samples of rates (and --watch).")
    ] = 1.0,
    as_json: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")
    ] = False,
    timeout_s: TimeoutOpt = 3.0,
) -> None:
    """Show every object (queues, locks, events, dicts, pipes...), sessions and deadlocks.

    The same document as /status.json on the metrics port.
    """
    import time

    from managerd.status import render, summarize

    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    interval_s = max(interval_s, 0.01)
    with _client(settings, timeout_s) as m:
        before = m.status()
        while True:
            time.sleep(interval_s)
            after = m.status()
            summary = summarize(before, after, interval_s)
            text = json.dumps(summary, indent=2) if as_json else render(summary)
            if not watch:
                typer.echo(text)
                return
            # Home the cursor and clear the screen, then draw: refreshed in place.
            # (typer.echo would strip the escape codes when stdout is not a terminal.)
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            before = after


@app.command("ls", cls=_Command)
def ls(
    pattern: Annotated[
        str | None, typer.Argument(help="Shell pattern (jobs*) or part of the name.")
    ] = None,
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
    timeout_s: TimeoutOpt = 3.0,
) -> None:
    """List objects: name and type, sorted by name."""
    from managerd.browse import matching

    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        found = matching(m.objects(), pattern)
    if as_json:
        typer.echo(json.dumps([{"name": n, "type": t} for n, t in found], indent=2))
        return
    width = max((len(n) for n, _ in found), default=0)
    for name, typeid in found:
        typer.echo(f"{name.ljust(width)}  {typeid}")


@app.command("get", cls=_Command)
def get(
    name: Annotated[str, typer.Argument(help="The object's name.")],
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many items (max 1000).")] = 10,
    timeout_s: TimeoutOpt = 3.0,
) -> None:
    """Print an object's contents as JSON, taking nothing.

    A dict, list, namespace, value or array: its contents; a queue: its first
    items, left in place; a lock, event...: its state. Values managerd
    clients stored are shown as data where the restricted decoder reads
    them, else as "<class pickle, N bytes>".
    """
    from managerd.browse import contents

    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        peeked = m.peek(name, limit)
    typer.echo(json.dumps(contents(peeked), indent=2, default=repr))


@app.command("put", cls=_Command)
def put(
    name: Annotated[str, typer.Argument(help="The object's name.")],
    value: Annotated[str, typer.Argument(help="A JSON value.")],
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    timeout_s: TimeoutOpt = 3.0,
) -> None:
    """Put a JSON VALUE into an existing object.

    A queue gets it as one item, a list appends it, a dict or namespace
    merges a JSON object, a Value is set to it.
    """
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _fail(f"VALUE is not JSON: {exc}", 2) from None
    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        _put(m, name, data)
    typer.echo(f"ok: {name}")


def _put(m: Manager, name: str, data: Any) -> None:
    from managerd_client import NoSuchObject

    typeid = dict(m.objects()).get(name)
    if typeid is None:
        raise _fail(f"no object named {name!r} (managerd ls lists them)", 1)
    try:
        if typeid in ("Queue", "JoinableQueue"):
            q = m.Queue(name) if typeid == "Queue" else m.JoinableQueue(name)
            q.put(data, timeout=10)
        elif typeid == "list":
            m.list(name).append(data)
        elif typeid in ("dict", "Namespace"):
            if not isinstance(data, dict):
                raise _fail(f"a {typeid} merges a JSON object, not {type(data).__name__}", 2)
            if typeid == "dict":
                m.dict(name).update(data)
            else:
                ns = m.Namespace(name)
                for key, item in data.items():
                    setattr(ns, key, item)
        elif typeid == "Value":
            typecode = m.peek(name)["describe"]["args"]["typecode"]
            m.Value(name, typecode).set(data)
        else:
            raise _fail(f"{name!r} is a {typeid}: put works on queues, lists, dicts, "
                        "namespaces and values", 2)  # fmt: skip
    except (NoSuchObject, TypeError, ValueError) as exc:
        raise _fail(f"cannot put into {typeid} {name!r}: {exc}", 1) from None


@app.command("del", cls=_Command)
def delete(
    name: Annotated[str, typer.Argument(help="The object's name.")],
    config: ConfigOpt = None,
    host: DaemonHostOpt = None,
    port: DaemonPortOpt = None,
    authkey_file: AuthkeyFileOpt = None,
    data_dir: DataDirOpt = None,
    timeout_s: TimeoutOpt = 3.0,
) -> None:
    """Delete an object (its waiters fail with NoSuchObject); exit 1 if there was none."""
    settings = _settings(config, host=host, port=port, authkey_file=authkey_file, data_dir=data_dir)
    with _client(settings, timeout_s) as m:
        existed = m.delete(name)
    if not existed:
        raise _fail(f"no object named {name!r}", 1)
    typer.echo(f"deleted {name}")


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
